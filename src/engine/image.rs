//! Image files → the RGB8 pixels the projector takes, decoded here with the `image` crate rather
//! than by llama.cpp's stb: phone photos are turned upright (EXIF orientation), WebP and TIFF are
//! read, every colour type becomes RGB8, and nothing is unbounded — the file is read only if it is
//! a regular file under a size bound, and the pixel count a header declares is checked before a
//! single pixel is decoded (a 1 MB PNG can declare 16000 × 16000 pixels, 768 MB as RGB).
//!
//! Colour conversion follows what llama.cpp's own loader (`stbi_load_from_memory(…, 3)`) and
//! transformers' CLIP image processors (`PIL.Image.convert("RGB")`) do, so the model sees what it
//! was trained and evaluated on: grey is replicated into R, G and B, 16-bit samples are scaled to
//! 8 bits, CMYK is converted by the decoder, and **alpha is dropped** (the colour under a
//! transparent pixel is kept, not composited on a background).
//!
//! [`decode`] works on bytes (for in-memory images too); [`load`] reads a file first.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::error::{Error, Result};

/// The formats [`decode`] reads, as messages name them.
pub const FORMATS: &str = "PNG, JPEG, WebP, GIF, BMP, TIFF, PNM, TGA";

/// Default pixel limit: 8192 × 8192 ≈ 67 MP — above any phone or camera photo up to 64 MP (and
/// 7000 × 7000), far below what would exhaust memory (≈ 200 MB as RGB8).
pub const DEFAULT_MAX_PIXELS: u64 = 8192 * 8192;

/// The largest pixel limit accepted: mtmd's bitmap size (`nx * ny * 3` bytes) is a 32-bit count.
pub const MAX_MAX_PIXELS: u64 = u32::MAX as u64 / 3;

/// A file read for an image is at most this many bytes, or 8 bytes per allowed pixel plus 1 MiB
/// if that is more: no compressed image near the pixel limit comes close (a 64 MP JPEG is some
/// 20–40 MB), and even an uncompressed 16-bit RGBA file at the limit fits — yet `/dev/zero`-like
/// input or a mislabelled multi-gigabyte file is refused before it is read.
pub const MIN_MAX_FILE_BYTES: u64 = 256 << 20;

/// Where the CLI sets the pixel limit (named in the message that refuses an image).
pub const MAX_PIXELS_FLAG: &str = "--image-max-mp";

/// Bounds on what decoding an image may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Most pixels (width × height, as declared by the file's header) an image may have.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_pixels: DEFAULT_MAX_PIXELS }
    }
}

impl ImageLimits {
    /// The limits for a request's `max_image_pixels` (`None`: the default).
    ///
    /// # Errors
    /// [`Error::Config`] for 0 or more than [`MAX_MAX_PIXELS`].
    pub fn new(max_pixels: Option<u64>) -> Result<Self> {
        let max_pixels = max_pixels.unwrap_or(DEFAULT_MAX_PIXELS);
        if max_pixels == 0 || max_pixels > MAX_MAX_PIXELS {
            return Err(Error::Config {
                field: MAX_PIXELS_FLAG,
                reason: format!(
                    "the image pixel limit must be between 1 pixel and {:.0} MP (mtmd counts an image's bytes in 32 bits), not {max_pixels} pixels",
                    mp(MAX_MAX_PIXELS).floor()
                ),
            });
        }
        Ok(Self { max_pixels })
    }

    /// The most bytes read from an image file (see [`MIN_MAX_FILE_BYTES`]).
    #[must_use]
    pub fn max_file_bytes(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(1 << 20).max(MIN_MAX_FILE_BYTES)
    }

    /// The decoder's allocation bound (`image::Limits::max_alloc`): the largest decoded buffer
    /// an image within the pixel limit needs (16-bit RGBA, 8 bytes a pixel), plus 64 MiB for the
    /// decoder's own tables and metadata chunks.
    #[must_use]
    pub fn max_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(64 << 20)
    }
}

/// Decoded pixels, `RGBRGB…` row by row, upright.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width × height × 3` bytes.
    pub rgb: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RgbImage").field("width", &self.width).field("height", &self.height).finish_non_exhaustive()
    }
}

/// Why bytes could not be turned into an image (each renders as the tail of one line).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Audio (WAV, MP3, FLAC, Ogg), which llama.cpp's loader would have taken as audio input.
    #[error("it is audio ({0}); csp-llava takes images")]
    Audio(&'static str),
    /// A known image format this build does not read (AVIF, ICO, …).
    #[error("{0} images are not supported (csp-llava reads {FORMATS})")]
    UnsupportedFormat(String),
    /// Not recognisable as an image.
    #[error("not an image, or not in a format csp-llava reads ({FORMATS})")]
    UnknownFormat,
    /// The header declares more pixels than the limit (checked before decoding).
    #[error(
        "it declares {width} × {height} pixels ({}), more than the {} allowed (raise the limit with {MAX_PIXELS_FLAG})",
        pixels(u64::from(*.width) * u64::from(*.height)),
        pixels(*.max_pixels)
    )]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max_pixels: u64,
    },
    /// A header declaring no pixels.
    #[error("it declares {width} × {height} pixels")]
    Empty {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// The decoder would need more memory than [`ImageLimits::max_alloc`].
    #[error("decoding it needs more than the {} MiB allowed ({reason})", .max_alloc >> 20)]
    TooMuchMemory {
        /// The bound.
        max_alloc: u64,
        /// The decoder's words.
        reason: String,
    },
    /// Corrupt, truncated, or a variant of the format the decoder does not handle.
    #[error("corrupt, truncated or unsupported {format} data ({reason})")]
    Corrupt {
        /// The format detected.
        format: &'static str,
        /// The decoder's words.
        reason: String,
    },
}

fn mp(pixels: u64) -> f64 {
    pixels as f64 / 1e6
}

/// "67.1 MP", or "4096 pixels" below 0.1 MP.
fn pixels(n: u64) -> String {
    if n >= 100_000 {
        format!("{:.1} MP", mp(n))
    } else {
        format!("{n} pixels")
    }
}

/// An image's upright size as its header declares it (EXIF rotations by 90° swap width and
/// height), after the same format and pixel-limit checks as [`decode`] — without decoding.
///
/// # Errors
/// As [`decode`], except for corrupt pixel data (found only when decoding).
pub fn probe(bytes: &[u8], limits: &ImageLimits) -> Result<(u32, u32), DecodeError> {
    probe_as(bytes, None, limits)
}

/// Decodes an image in any of the [`FORMATS`] to upright RGB8 (see the module docs for the
/// conversions). The declared size is checked against `limits` before anything is decoded, and the
/// decoder's allocations are bounded by [`ImageLimits::max_alloc`].
///
/// # Errors
/// [`DecodeError`]: audio, unknown or unsupported formats, too many pixels, corrupt data.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, DecodeError> {
    decode_as(bytes, None, limits)
}

/// Reads (at most [`ImageLimits::max_file_bytes`], regular files only) and [`decode`]s an image
/// file. A file whose content names no format is tried as TGA when its name ends in `.tga` (TGA
/// has no signature).
///
/// # Errors
/// `NotFound`, `NotRegularFile`, `TooLarge`, `Io` from reading; [`Error::Unsupported`] for audio;
/// [`Error::Image`] for the other [`DecodeError`]s.
pub fn load(path: &Path, limits: &ImageLimits) -> Result<RgbImage> {
    let bytes = crate::input::read_bounded(path, "image", limits.max_file_bytes())?;
    decode_as(&bytes, hint(path), limits).map_err(|e| to_error(path, e))
}

/// [`probe`] for a file (read as [`load`] reads it).
///
/// # Errors
/// As [`load`].
pub fn probe_file(path: &Path, limits: &ImageLimits) -> Result<(u32, u32)> {
    let bytes = crate::input::read_bounded(path, "image", limits.max_file_bytes())?;
    probe_as(&bytes, hint(path), limits).map_err(|e| to_error(path, e))
}

/// The library error for a file that did not decode.
pub(crate) fn to_error(path: &Path, e: DecodeError) -> Error {
    match e {
        DecodeError::Audio(_) => Error::Unsupported { what: "input", reason: format!("{} is audio; csp-llava takes images", path.display()) },
        e => Error::Image { name: path.display().to_string(), reason: e.to_string() },
    }
}

/// The library error for an image in memory that did not decode.
pub(crate) fn data_error(name: &str, e: DecodeError) -> Error {
    match e {
        DecodeError::Audio(_) => Error::Unsupported { what: "input", reason: format!("{name} is audio; csp-llava takes images") },
        e => Error::Image { name: name.to_owned(), reason: e.to_string() },
    }
}

fn hint(path: &Path) -> Option<ImageFormat> {
    let ext = path.extension()?.to_str()?;
    ext.eq_ignore_ascii_case("tga").then_some(ImageFormat::Tga)
}

fn probe_as(bytes: &[u8], hint: Option<ImageFormat>, limits: &ImageLimits) -> Result<(u32, u32), DecodeError> {
    let (mut decoder, _) = open(bytes, hint, limits)?;
    let (w, h) = decoder.dimensions();
    Ok(if swaps_axes(orientation(&mut decoder)) { (h, w) } else { (w, h) })
}

fn decode_as(bytes: &[u8], hint: Option<ImageFormat>, limits: &ImageLimits) -> Result<RgbImage, DecodeError> {
    let (mut decoder, format) = open(bytes, hint, limits)?;
    let orientation = orientation(&mut decoder);
    let max_alloc = limits.max_alloc();
    if decoder.total_bytes() > max_alloc {
        return Err(DecodeError::TooMuchMemory { max_alloc, reason: format!("{} bytes of decoded pixels", decoder.total_bytes()) });
    }
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e, limits))?;
    // RGB8 first (no copy when the decoder gave RGB8), so a rotation moves 3 bytes a pixel
    let mut upright = DynamicImage::ImageRgb8(decoded.into_rgb8());
    upright.apply_orientation(orientation);
    let rgb = upright.into_rgb8();
    let (width, height) = rgb.dimensions();
    Ok(RgbImage { width, height, rgb: rgb.into_raw() })
}

/// The format, a decoder with the limits set, and the declared size checked.
fn open<'a>(bytes: &'a [u8], hint: Option<ImageFormat>, limits: &ImageLimits) -> Result<(impl ImageDecoder + 'a, ImageFormat), DecodeError> {
    let format = match image::guess_format(bytes).ok().or(hint) {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif | ImageFormat::Bmp | ImageFormat::Tiff | ImageFormat::Pnm | ImageFormat::Tga)) => f,
        Some(other) => return Err(DecodeError::UnsupportedFormat(format!("{other:?}").to_uppercase())),
        None => return Err(audio_kind(bytes).map_or(DecodeError::UnknownFormat, DecodeError::Audio)),
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = Limits::default();
    l.max_alloc = Some(limits.max_alloc());
    reader.limits(l);
    let decoder = reader.into_decoder().map_err(|e| decode_error(format, e, limits))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DecodeError::Empty { width, height });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(DecodeError::TooManyPixels { width, height, max_pixels: limits.max_pixels });
    }
    Ok((decoder, format))
}

/// EXIF orientation; unreadable metadata counts as none (the pixels may still be fine).
fn orientation(decoder: &mut impl ImageDecoder) -> image::metadata::Orientation {
    decoder.orientation().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "unreadable image metadata; orientation ignored");
        image::metadata::Orientation::NoTransforms
    })
}

fn swaps_axes(o: image::metadata::Orientation) -> bool {
    use image::metadata::Orientation as O;
    matches!(o, O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH)
}

fn decode_error(format: ImageFormat, e: image::ImageError, limits: &ImageLimits) -> DecodeError {
    let reason = e.to_string().replace(['\n', '\r'], " ");
    match e {
        image::ImageError::Limits(_) => DecodeError::TooMuchMemory { max_alloc: limits.max_alloc(), reason },
        _ => DecodeError::Corrupt { format: format_name(format), reason },
    }
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Pnm => "PNM",
        ImageFormat::Tga => "TGA",
        _ => "image",
    }
}

/// Audio containers by their signature (what llama.cpp's loader, miniaudio, would have decoded).
fn audio_kind(b: &[u8]) -> Option<&'static str> {
    if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WAVE" {
        Some("WAV")
    } else if b.starts_with(b"fLaC") {
        Some("FLAC")
    } else if b.starts_with(b"OggS") {
        Some("Ogg")
    } else if b.starts_with(b"ID3") || (b.len() >= 2 && b[0] == 0xFF && b[1] & 0xE0 == 0xE0) {
        Some("MP3")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn colour_types_become_rgb8_with_alpha_dropped() {
        let rgba = image::RgbaImage::from_fn(3, 2, |x, y| image::Rgba([x as u8 * 10, y as u8 * 20, 7, if x == 0 { 0 } else { 128 }]));
        let d = decode(&png(&DynamicImage::ImageRgba8(rgba)), &ImageLimits::default()).unwrap();
        assert_eq!((d.width, d.height), (3, 2));
        assert_eq!(&d.rgb[..6], &[0, 0, 7, 10, 0, 7], "alpha dropped, colour kept");
        let grey16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(2, 2, |x, _| image::Luma([if x == 0 { 0 } else { 65535 }]));
        let d = decode(&png(&DynamicImage::ImageLuma16(grey16)), &ImageLimits::default()).unwrap();
        assert_eq!(d.rgb, vec![0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255]);
    }

    #[test]
    fn limits_are_checked_on_the_header() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::new(40, 30));
        let bytes = png(&img);
        let small = ImageLimits { max_pixels: 1000 };
        let e = decode(&bytes, &small).unwrap_err();
        assert!(matches!(e, DecodeError::TooManyPixels { width: 40, height: 30, .. }), "{e}");
        assert!(matches!(probe(&bytes, &small), Err(DecodeError::TooManyPixels { .. })));
        assert_eq!(probe(&bytes, &ImageLimits::default()).unwrap(), (40, 30));
        assert!(ImageLimits::new(Some(0)).is_err());
        assert!(ImageLimits::new(Some(MAX_MAX_PIXELS + 1)).is_err());
        assert_eq!(ImageLimits::new(None).unwrap(), ImageLimits::default());
        assert!(ImageLimits::default().max_file_bytes() >= MIN_MAX_FILE_BYTES);
    }

    #[test]
    fn what_is_not_an_image() {
        let l = ImageLimits::default();
        assert!(matches!(decode(b"plain text", &l), Err(DecodeError::UnknownFormat)));
        assert!(matches!(decode(b"", &l), Err(DecodeError::UnknownFormat)));
        let mut wav = b"RIFF\x24\0\0\0WAVEfmt ".to_vec();
        wav.extend([0u8; 32]);
        assert!(matches!(decode(&wav, &l), Err(DecodeError::Audio("WAV"))));
        assert!(matches!(decode(b"ID3\x04\0\0\0\0\0\0", &l), Err(DecodeError::Audio("MP3"))));
        assert!(matches!(decode(b"fLaC\0\0\0\x22", &l), Err(DecodeError::Audio("FLAC"))));
        let e = decode(b"\0\0\x01\0\x01\0\x10\x10\0\0\x01\0\x20\0", &l).unwrap_err();
        assert!(matches!(e, DecodeError::UnsupportedFormat(_)), "{e}");
        let mut truncated = png(&DynamicImage::ImageRgb8(image::RgbImage::new(64, 64)));
        truncated.truncate(truncated.len() - 30);
        let e = decode(&truncated, &l).unwrap_err();
        assert!(matches!(e, DecodeError::Corrupt { format: "PNG", .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
    }
}
