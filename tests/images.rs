//! Images as people have them (issue 13): EXIF-rotated phone photos, WebP, 16-bit / grey / RGBA /
//! palette PNGs — and images as an attacker has them: decompression bombs, devices, FIFOs,
//! directories, audio, and prompts whose images can never fit the context (refused before any
//! image is decoded). Every bad input is one `csp-llava: error:` line and exit 1, quickly.

mod support;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use csp_llava::config::{ContextConfig, Request};
use csp_llava::engine::image::{decode, load, probe, DecodeError, ImageLimits};
use image::{DynamicImage, ImageFormat};

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

fn csp_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_csp-llava"));
    c.args(args).env_remove("RUST_LOG");
    c
}

/// Runs with the tiny model + `extra`, killed after `deadline` (a hang fails the test, it does
/// not hang it). Returns the output and the wall time.
fn run_tiny_within(extra: &[&str], deadline: Duration) -> (Output, Duration) {
    let (m, p) = (s(&support::model()), s(&support::mmproj()));
    let mut args = vec!["-m", m.as_str(), "--mmproj", p.as_str(), "-t", "1"];
    args.extend_from_slice(extra);
    run_within(csp_cmd(&args), deadline)
}

fn run_within(mut cmd: Command, deadline: Duration) -> (Output, Duration) {
    let t = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("binary runs");
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), t.elapsed());
        }
        if t.elapsed() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {deadline:?} (killed); stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run_tiny(extra: &[&str]) -> Output {
    run_tiny_within(extra, Duration::from_secs(60)).0
}

/// A clean failure: exit 1, one stderr line `csp-llava: error: …` containing `needle`.
#[track_caller]
fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1; stderr: {err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("csp-llava: error: "), "{err}");
    assert!(lines[0].contains(needle), "expected '{needle}' in: {err}");
}

#[track_caller]
fn assert_succeeds(out: &Output) {
    assert!(out.status.success(), "expected success; stderr: {}", String::from_utf8_lossy(&out.stderr));
}

fn dir() -> PathBuf {
    let d = support::scratch().join("images");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A non-square image with no symmetry: a smooth gradient (JPEG-friendly) plus a bright block in
/// the top-left corner.
fn asymmetric(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        if x < w / 4 && y < h / 3 {
            image::Rgb([250, 250, 40])
        } else {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90])
        }
    })
}

/// `jpeg` with an EXIF APP1 segment (big-endian TIFF, one IFD entry: Orientation = `o`) inserted
/// right after SOI — what a phone writes for a photo taken in portrait.
fn with_exif_orientation(jpeg: &[u8], o: u16) -> Vec<u8> {
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
    let mut tiff = b"MM\0\x2A\0\0\0\x08".to_vec();
    tiff.extend(1u16.to_be_bytes()); // one entry
    tiff.extend(0x0112u16.to_be_bytes()); // Orientation
    tiff.extend(3u16.to_be_bytes()); // SHORT
    tiff.extend(1u32.to_be_bytes()); // count
    tiff.extend(o.to_be_bytes());
    tiff.extend([0, 0]); // value padding
    tiff.extend(0u32.to_be_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend([0xFF, 0xE1]);
    out.extend(u16::try_from(app1.len() + 2).unwrap().to_be_bytes());
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}

/// The embeddings of the single image of a one-image prompt.
fn embeddings(engine: &csp_llava::Engine, image: &Path) -> Vec<f32> {
    let prompt = engine.prepare(&Request { images: vec![image.to_owned()], prompt: "x".into(), ..Default::default() }).unwrap();
    let chunk = prompt.spans.iter().position(|s| s.media == Some(0)).unwrap();
    engine.media_embeddings(&prompt, chunk).unwrap()
}

#[test]
fn exif_orientation_6_turns_a_phone_photo_upright() {
    let plain = encode(&DynamicImage::ImageRgb8(asymmetric(48, 32)), ImageFormat::Jpeg);
    let rotated_jpeg = with_exif_orientation(&plain, 6);
    let limits = ImageLimits::default();

    // the pixels as stored, and the same pixels turned 90° clockwise (EXIF 6), saved losslessly
    let stored = decode(&plain, &limits).unwrap();
    assert_eq!((stored.width, stored.height), (48, 32));
    let stored_img = image::RgbImage::from_raw(48, 32, stored.rgb.clone()).unwrap();
    let upright_png = encode(&DynamicImage::ImageRgb8(image::imageops::rotate90(&stored_img)), ImageFormat::Png);

    let got = decode(&rotated_jpeg, &limits).unwrap();
    assert_eq!((got.width, got.height), (32, 48), "EXIF 6: width and height swap");
    assert_eq!(got, decode(&upright_png, &limits).unwrap(), "EXIF-6 JPEG = the stored pixels turned 90° clockwise");
    assert_eq!(probe(&rotated_jpeg, &limits).unwrap(), (32, 48), "the probe sees the upright size");
    // the bright corner block, top-left as stored, is top-right once upright
    let px = |img: &image::RgbImage, x: u32, y: u32| img.get_pixel(x, y).0;
    let upright = image::RgbImage::from_raw(32, 48, got.rgb.clone()).unwrap();
    assert!(px(&upright, 30, 2)[2] < 100 && px(&upright, 1, 2)[2] > 60, "block at the top right");

    // through mtmd: the rotated JPEG and the upright PNG give the model the same embeddings
    let (exif_path, png_path, plain_path) = (write("exif6.jpg", &rotated_jpeg), write("upright.png", &upright_png), write("stored.jpg", &plain));
    let engine = support::engine();
    let e_exif = embeddings(&engine, &exif_path);
    assert_eq!(e_exif, embeddings(&engine, &png_path));
    assert_ne!(e_exif, embeddings(&engine, &plain_path), "ignoring EXIF would feed the photo sideways");

    assert_succeeds(&run_tiny(&["--image", &s(&exif_path), "-p", "What is in the photo?", "-n", "2", "-c", "512"]));
}

/// A palette PNG (with a transparent entry) through the png crate.
fn palette_png() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 16, 8);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]);
        enc.set_trns(vec![255, 255, 255, 0]);
        let mut w = enc.write_header().unwrap();
        let data: Vec<u8> = (0..16 * 8).map(|i| (i % 4) as u8).collect();
        w.write_image_data(&data).unwrap();
    }
    out
}

#[test]
fn webp_16_bit_grey_rgba_and_palette_images_work() {
    let limits = ImageLimits::default();
    let rgb = asymmetric(40, 24);
    let rgba = image::RgbaImage::from_fn(40, 24, |x, y| {
        let p = rgb.get_pixel(x, y).0;
        image::Rgba([p[0], p[1], p[2], (x * 6) as u8])
    });

    // lossless WebP decodes to exactly the pixels encoded (RGB and RGBA with alpha dropped)
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp).encode(rgb.as_raw(), 40, 24, image::ExtendedColorType::Rgb8).unwrap();
    assert_eq!(decode(&webp, &limits).unwrap().rgb, rgb.as_raw().clone());
    let mut webp_rgba = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp_rgba).encode(rgba.as_raw(), 40, 24, image::ExtendedColorType::Rgba8).unwrap();

    let rgba_png = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
    assert_eq!(decode(&rgba_png, &limits).unwrap().rgb, rgb.as_raw().clone(), "alpha is dropped, the colour kept (as llama.cpp's stb loader does)");
    let rgb16 = DynamicImage::ImageRgb8(rgb.clone()).into_rgb16();
    let png16 = encode(&DynamicImage::ImageRgb16(rgb16), ImageFormat::Png);
    assert_eq!(decode(&png16, &limits).unwrap().rgb, rgb.as_raw().clone(), "16-bit samples scale back to the 8-bit ones");
    let grey = DynamicImage::ImageRgb8(rgb.clone()).into_luma8();
    let grey_png = encode(&DynamicImage::ImageLuma8(grey.clone()), ImageFormat::Png);
    let g = decode(&grey_png, &limits).unwrap();
    assert!(g.rgb.chunks(3).zip(grey.as_raw()).all(|(p, &l)| p == [l, l, l]), "grey is replicated into R, G, B");
    let pal = decode(&palette_png(), &limits).unwrap();
    assert_eq!((pal.width, pal.height), (16, 8));
    assert_eq!(&pal.rgb[..12], &[255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]);
    let grey_alpha = DynamicImage::ImageLumaA16(DynamicImage::ImageLuma8(grey).into_luma_alpha16());
    let gif = encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Gif);
    let tiff = encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Tiff);
    let bmp = encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Bmp);
    let pnm = encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Pnm);
    // TGA has no signature: known by its file name
    let tga = encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Tga);
    assert!(decode(&tga, &limits).is_err());
    assert_eq!(load(&write("check.tga", &tga), &limits).unwrap().rgb, rgb.as_raw().clone());

    let files = [
        write("lossless.webp", &webp),
        write("alpha.webp", &webp_rgba),
        write("rgba.png", &rgba_png),
        write("rgb16.png", &png16),
        write("grey.png", &grey_png),
        write("grey-alpha16.png", &encode(&grey_alpha, ImageFormat::Png)),
        write("palette.png", &palette_png()),
        write("anim.gif", &gif),
        write("scan.tiff", &tiff),
        write("old.bmp", &bmp),
        write("raw.ppm", &pnm),
        write("old.tga", &tga),
    ];
    for f in &files {
        let out = run_tiny(&["--image", &s(f), "-p", "Describe it.", "-n", "2", "-c", "512"]);
        assert!(out.status.success(), "{}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
    }
    let mut all = Vec::new();
    for f in &files {
        all.extend(["--image".to_owned(), s(f)]);
    }
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    assert_succeeds(&run_tiny(&[&all[..], &["-p", "Compare them.", "-n", "2", "-c", "2048"]].concat()));
}

/// CRC-32 (PNG chunks), bitwise.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A valid 1×1 PNG whose IHDR is rewritten to declare `w × h` (CRC recomputed): a few hundred
/// bytes that a decoder trusting the header would allocate `w × h × 3` bytes for.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut png = encode(&DynamicImage::ImageRgb8(image::RgbImage::new(1, 1)), ImageFormat::Png);
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn a_decompression_bomb_is_refused_from_its_header() {
    let bomb = png_declaring(16000, 16000);
    assert!(bomb.len() < 200);
    let t = Instant::now();
    let e = decode(&bomb, &ImageLimits::default()).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "no allocation, no decoding: {:?}", t.elapsed());
    assert!(matches!(e, DecodeError::TooManyPixels { width: 16000, height: 16000, .. }), "{e}");

    let path = write("bomb.png", &bomb);
    let (out, took) = run_tiny_within(&["--image", &s(&path), "-p", "hi", "-n", "1"], Duration::from_secs(30));
    assert_fails_with(&out, "16000 × 16000 pixels (256.0 MP), more than the 67.1 MP allowed");
    assert!(took < Duration::from_secs(10), "{took:?}");

    // 7000 × 7000 (49 MP) is within the default; the limit is a request setting
    assert!(matches!(probe(&png_declaring(7000, 7000), &ImageLimits::default()), Ok((7000, 7000))));
    let engine = support::engine();
    let small = write("small.png", &encode(&DynamicImage::ImageRgb8(asymmetric(100, 50)), ImageFormat::Png));
    let req = |max| Request { images: vec![small.clone()], prompt: "x".into(), max_image_pixels: max, ..Default::default() };
    assert!(engine.prepare(&req(None)).is_ok());
    assert!(engine.prepare(&req(Some(5000))).is_ok());
    let e = engine.prepare(&req(Some(4999))).unwrap_err().to_string();
    assert!(e.contains("100 × 50 pixels (5000 pixels), more than the 4999 pixels allowed"), "{e}");
    assert!(engine.prepare(&req(Some(0))).is_err());
}

#[test]
fn devices_fifos_directories_big_files_and_audio_are_one_line_each() {
    let (out, _) = run_tiny_within(&["--image", "/dev/zero", "-p", "hi"], Duration::from_secs(30));
    assert_fails_with(&out, "not a regular file");
    let (out, _) = run_tiny_within(&["--image", "/dev/urandom", "-p", "hi"], Duration::from_secs(30));
    assert_fails_with(&out, "not a regular file");

    let fifo = dir().join("fifo.png");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (out, _) = run_tiny_within(&["--image", &s(&fifo), "-p", "hi"], Duration::from_secs(30));
    assert_fails_with(&out, "not a regular file");

    let d = dir().join("a-directory.jpg");
    std::fs::create_dir_all(&d).unwrap();
    assert_fails_with(&run_tiny(&["--image", &s(&d), "-p", "hi"]), "is a directory");

    // a sparse 4 GiB file: refused by its size, not read
    let big = dir().join("huge.png");
    std::fs::File::create(&big).unwrap().set_len(4 << 30).unwrap();
    let (out, took) = run_tiny_within(&["--image", &s(&big), "-p", "hi"], Duration::from_secs(30));
    assert_fails_with(&out, "more than the");
    assert!(took < Duration::from_secs(10));
    std::fs::remove_file(&big).unwrap();

    let mut wav = b"RIFF\x24\x08\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0\x80\x3e\0\0\0\x7d\0\0\x02\0\x10\0data\0\x08\0\0".to_vec();
    wav.extend([0u8; 2048]);
    assert_fails_with(&run_tiny(&["--image", &s(&write("speech.wav", &wav)), "-p", "hi"]), "is audio");
    assert_fails_with(&run_tiny(&["--image", &s(&write("notes.png", b"plain text")), "-p", "hi"]), "cannot decode image");
}

/// A PNG whose header is valid (64 × 64) but whose pixel data is cut short: decoding it fails.
fn png_with_truncated_pixels() -> Vec<u8> {
    let noise = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 37 + y * 11) as u8, (x * y) as u8, (x ^ y) as u8]));
    let mut png = encode(&DynamicImage::ImageRgb8(noise), ImageFormat::Png);
    png.truncate(png.len() / 2);
    png
}

#[test]
fn forty_images_that_cannot_fit_are_refused_before_any_is_decoded() {
    // 40 images whose pixels do not decode: the length error comes first, so none was decoded
    let bad = write("truncated.png", &png_with_truncated_pixels());
    assert!(probe(&std::fs::read(&bad).unwrap(), &ImageLimits::default()).is_ok());
    assert_fails_with(&run_tiny(&["--image", &s(&bad), "-p", "hi", "-c", "512"]), "cannot decode image");
    let mut args: Vec<String> = Vec::new();
    for _ in 0..40 {
        args.extend(["--image".into(), s(&bad)]);
    }
    args.extend(["-p".into(), "Compare them.".into(), "-c".into(), "256".into()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tiny(&a);
    assert_fails_with(&out, "(2560 of them from 40 image(s)) but the context holds 256");

    // the library: `prepare_for` refuses, `prepare` (no context known) decodes and fails on pixels
    let engine = support::engine();
    let req = Request { images: vec![bad.clone(); 40], prompt: "x".into(), ..Default::default() };
    let e = engine.prepare_for(&req, &ContextConfig { n_ctx: 256, ..Default::default() }).unwrap_err();
    assert!(matches!(e, csp_llava::Error::PromptTooLong { n_image_tokens: 2560, n_images: 40, n_ctx: 256, .. }), "{e}");
    // -c 0 means the trained context (4096 for the tiny model): 40 × 64 tokens fit, so it decodes
    let e = engine.prepare_for(&req, &ContextConfig::default()).unwrap_err().to_string();
    assert!(e.contains("cannot decode image"), "{e}");

    // and it is fast: 40 distinct 4-megapixel photos, refused in far less than decoding one of
    // them 40 times takes
    let big = encode(&DynamicImage::ImageRgb8(asymmetric(2400, 1600)), ImageFormat::Png);
    let files: Vec<PathBuf> = (0..40).map(|i| write(&format!("big-{i}.png"), &big)).collect();
    let t = Instant::now();
    for f in &files[..4] {
        load(f, &ImageLimits::default()).unwrap();
    }
    let decode_40 = t.elapsed() * 10;
    let mut args: Vec<String> = Vec::new();
    for f in &files {
        args.extend(["--image".into(), s(f)]);
    }
    args.extend(["-p".into(), "Compare them.".into(), "-c".into(), "256".into()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, took) = run_tiny_within(&a, Duration::from_secs(120));
    assert_fails_with(&out, "(2560 of them from 40 image(s)) but the context holds 256");
    assert!(took * 3 < decode_40, "refusing took {took:?}; decoding the 40 images takes {decode_40:?}");
}

/// Total size of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn bench_with_ten_thousand_images_fails_fast_without_writing_gigabytes() {
    let tmp = dir().join("bench-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let (m, p) = (s(&support::model()), s(&support::mmproj()));
    let mut cmd = csp_cmd(&["bench", "--images", "10000", "-r", "1", "-n", "1", "--kv-policy", "streaming", "--kv-budget", "0.5", "-m", &m, "--mmproj", &p, "-t", "1"]);
    cmd.env("TMPDIR", &tmp);
    let t = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(du(&tmp));
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("bench --images 10000 still running after 60 s; {peak} bytes of temporary files");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_fails_with(&out, "from 10000 image(s)) but the context holds 4096");
    assert!(peak < 50 << 20, "{peak} bytes of temporary images");
    assert_eq!(du(&tmp), 0, "temporary images removed");
}
