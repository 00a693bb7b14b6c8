//! `Chat`: images read and pruned once before any question, several questions answered from
//! the pruned cache reading only each new turn, answers appended, stopping from the callback,
//! errors that leave the chat usable; and the types an app keeps on worker threads.

mod support;

use std::sync::Arc;

use csp_llava::engine::StopReason;
use csp_llava::{Budget, Chat, ChatConfig, ChatEvent, ContextConfig, Engine, Flow, PolicyConfig, PolicyKind, Request, SamplingConfig};

fn greedy(n: i32) -> SamplingConfig {
    SamplingConfig { n_predict: n, temp: 0.0, ignore_eos: true, seed: Some(1), ..Default::default() }
}

fn config(kind: PolicyKind, budget: f64) -> ChatConfig {
    ChatConfig {
        ctx: ContextConfig { n_ctx: 1024, ..Default::default() },
        policy: PolicyConfig { kind, budget: Budget::Fraction(budget), ..Default::default() },
        sampling: greedy(8),
        ..Default::default()
    }
}

fn quiet(_: ChatEvent<'_>) -> Flow {
    Flow::Continue
}

#[test]
fn engines_and_chats_move_to_worker_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Engine>();
    send::<Chat>();
    // and one really does: a chat asked on another thread
    let engine = Arc::new(support::engine());
    let mut chat = Chat::new(Arc::clone(&engine), config(PolicyKind::Csp, 0.2));
    chat.add_image(support::image(0));
    let answer = std::thread::spawn(move || chat.ask("Colour?", &mut quiet).unwrap()).join().unwrap();
    assert_eq!(answer.n_tokens, 8);
}

#[test]
fn first_answer_with_the_full_cache_is_the_one_shot_answer() {
    let engine = Arc::new(support::engine());
    let images: Vec<_> = (0..3).map(support::image).collect();
    let q = "Which image is red?";
    let one_shot = engine
        .run(&Request { images: images.clone(), prompt: q.into(), ..Default::default() }, &ContextConfig { n_ctx: 1024, ..Default::default() }, &greedy(8), &PolicyConfig::default(), &mut |_| {})
        .unwrap();
    let mut chat = Chat::new(engine, config(PolicyKind::Full, 1.0));
    for p in &images {
        chat.add_image(p);
    }
    let answer = chat.ask(q, &mut quiet).unwrap();
    assert_eq!(answer.text, one_shot.text, "the question read after the images gives the one-shot answer");
    assert_eq!(chat.stats().cells_after_pruning, chat.stats().cells_before_pruning, "full keeps everything");
}

#[test]
fn images_are_pruned_once_and_later_turns_read_only_their_text() {
    let engine = Arc::new(support::engine());
    let mut chat = Chat::new(engine, config(PolicyKind::Csp, 0.2));
    for i in 0..4 {
        chat.add_image(support::image(i));
    }
    let mut events = Vec::new();
    chat.read_images(&mut |e| {
        events.push(format!("{e:?}"));
        Flow::Continue
    })
    .unwrap();
    let s = chat.stats();
    assert_eq!(s.n_images, 4);
    assert!(s.cells_before_pruning >= 4 * 64, "the images' prompt was read: {s:?}");
    assert_eq!(s.cells_after_pruning, (f64::from(s.cells_before_pruning) * 0.2).floor() as u32, "CSP kept 0.2 of it");
    assert!(events.iter().any(|e| e.starts_with("Pruned")) && events.iter().any(|e| e.starts_with("Reading")), "{events:?}");

    let mut cells = s.cells_after_pruning;
    for (i, q) in ["Which image shows a circle?", "And which one is blue?", "How many images are there?"].iter().enumerate() {
        let mut text = String::new();
        let a = chat.ask(q, &mut |e| {
            if let ChatEvent::Text(t) = e {
                text.push_str(t);
            }
            Flow::Continue
        })
        .unwrap();
        assert_eq!(a.text, text, "turn {i}: the pieces make the answer");
        assert_eq!(a.n_tokens, 8);
        assert!(a.n_question_tokens > 0 && a.n_question_tokens < 80, "turn {i}: only the new turn is read (the images took 256) ({} tokens)", a.n_question_tokens);
        // the cache grows by the question and the answer only: the images are not read again
        assert_eq!(a.kv_cells, cells + a.n_question_tokens as u32 + 8, "turn {i}");
        cells = a.kv_cells;
    }
    assert_eq!(chat.stats().n_turns, 3);
    let t = chat.transcript();
    assert_eq!(t.len(), 6);
    assert_eq!(t[2], ("user".to_string(), "And which one is blue?".to_string()));
    assert_eq!(chat.stats().cells_after_pruning, s.cells_after_pruning, "pruned once");
}

#[test]
fn stopping_an_answer_leaves_the_chat_usable() {
    let engine = Arc::new(support::engine());
    let mut chat = Chat::new(engine, config(PolicyKind::Csp, 0.2));
    chat.add_image(support::image(1));
    chat.add_image(support::image(2));
    let mut pieces = 0;
    let a = chat.ask("Describe each image.", &mut |e| {
        if matches!(e, ChatEvent::Text(_)) {
            pieces += 1;
            return Flow::Stop;
        }
        Flow::Continue
    })
    .unwrap();
    assert_eq!(a.stop, StopReason::Cancelled);
    assert_eq!(pieces, 1);
    assert!(a.n_tokens <= 2, "stopped at the first piece: {} tokens", a.n_tokens);
    let b = chat.ask("Which one is larger?", &mut quiet).unwrap();
    assert_eq!(b.n_tokens, 8);
    assert_eq!(chat.stats().n_turns, 2);
}

#[test]
fn bad_turns_are_errors_and_change_nothing() {
    let engine = Arc::new(support::engine());
    let mut chat = Chat::new(engine, config(PolicyKind::Csp, 0.2));
    chat.add_image(support::image(0));
    assert!(chat.ask("   ", &mut quiet).unwrap_err().to_string().contains("empty"));
    chat.ask("Colour?", &mut quiet).unwrap();
    let before = chat.stats();
    chat.add_image(support::image(1));
    let err = chat.ask("And now?", &mut quiet).unwrap_err().to_string();
    assert!(err.contains("before the first question"), "{err}");
    assert_eq!(chat.stats(), before);
    chat.reset();
    assert_eq!(chat.stats().n_turns, 0);
    chat.add_image(support::image(1));
    assert_eq!(chat.ask("Shape?", &mut quiet).unwrap().n_tokens, 8);
    // a missing image: one line, and the chat can still be reset and used
    let mut chat2 = Chat::new(Arc::new(support::engine()), config(PolicyKind::Csp, 0.2));
    chat2.add_image("/nonexistent/x.png");
    let err = chat2.ask("Colour?", &mut quiet).unwrap_err().to_string();
    assert!(!err.contains('\n') && err.contains("x.png"), "{err}");
}

#[test]
fn a_text_only_chat_works_too() {
    let engine = Arc::new(support::engine());
    let mut chat = Chat::new(engine, config(PolicyKind::Csp, 0.2));
    let a = chat.ask("Hello there", &mut quiet).unwrap();
    assert_eq!(a.n_tokens, 8);
    let b = chat.ask("Go on", &mut quiet).unwrap();
    assert!(b.n_question_tokens > 0);
    assert_eq!(b.kv_cells, a.kv_cells + b.n_question_tokens as u32 + 8);
}

#[test]
fn images_in_memory_answer_like_files() {
    use csp_llava::config::ImageData;
    let engine = Arc::new(support::engine());
    let ask = |images: Vec<ImageData>| {
        let mut chat = Chat::new(Arc::clone(&engine), config(PolicyKind::Csp, 0.2));
        for i in images {
            chat.add_image_data(i);
        }
        chat.ask("Which image is red?", &mut quiet).map(|a| a.text)
    };
    let files: Vec<_> = (0..2).map(support::image).collect();
    let bytes: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let from_files = ask(files.iter().map(|f| ImageData::File(f.clone())).collect()).unwrap();
    let encoded = ask(bytes.iter().enumerate().map(|(i, b)| ImageData::Encoded { name: format!("buffer {i}"), bytes: Arc::new(b.clone()) }).collect()).unwrap();
    let limits = csp_llava::engine::image::ImageLimits::new(None).unwrap();
    let rgb = ask(bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let img = csp_llava::engine::image::decode(b, &limits).unwrap();
            ImageData::Rgb { name: format!("pixels {i}"), width: img.width, height: img.height, rgb: Arc::new(img.rgb) }
        })
        .collect())
    .unwrap();
    assert_eq!(encoded, from_files);
    assert_eq!(rgb, from_files);
    // a buffer of the wrong size, and bytes that are no image: one line naming the buffer
    let err = ask(vec![ImageData::Rgb { name: "bad pixels".into(), width: 4, height: 4, rgb: Arc::new(vec![0; 47]) }]).unwrap_err().to_string();
    assert!(err.contains("bad pixels") && err.contains("47 bytes") && !err.contains('\n'), "{err}");
    let err = ask(vec![ImageData::Encoded { name: "noise".into(), bytes: Arc::new(vec![7; 100]) }]).unwrap_err().to_string();
    assert!(err.contains("noise") && !err.contains('\n'), "{err}");
}

#[test]
fn a_saved_chat_continues_with_the_same_answer_in_a_fresh_engine() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.chat");
    for temp in [0.0, 0.9] {
        let mut cfg = config(PolicyKind::Csp, 0.2);
        cfg.sampling = SamplingConfig { n_predict: 12, temp, ignore_eos: true, seed: Some(7), ..Default::default() };
        let mut live = Chat::new(Arc::new(support::engine()), cfg.clone());
        for i in 0..3 {
            live.add_image(support::image(i));
        }
        live.ask("Which image is red?", &mut quiet).unwrap();
        live.ask("And which is blue?", &mut quiet).unwrap();
        live.save(&file).unwrap();
        let next = live.ask("How many are there?", &mut quiet).unwrap();
        // another engine (as another process would load it) and a default config: the file
        // brings the context, template and sampling settings
        let mut loaded = Chat::load(Arc::new(support::engine()), &file, ChatConfig::default()).unwrap();
        assert_eq!(loaded.stats().n_turns, 2);
        assert_eq!(loaded.transcript().len(), 4);
        assert_eq!(loaded.stats().kv_cells, live.stats().kv_cells - next.n_question_tokens as u32 - 12);
        let again = loaded.ask("How many are there?", &mut quiet).unwrap();
        assert_eq!(again.text, next.text, "temp {temp}: the loaded chat answers as the live one");
        assert_eq!(again.kv_cells, next.kv_cells);
    }
    // damaged, truncated, foreign and another model's files: one clear line each
    let bytes = std::fs::read(&file).unwrap();
    let engine = Arc::new(support::engine());
    let load_err = |b: &[u8]| {
        let f = dir.path().join("bad.chat");
        std::fs::write(&f, b).unwrap();
        Chat::load(Arc::clone(&engine), &f, ChatConfig::default()).unwrap_err().to_string()
    };
    assert!(load_err(&bytes[..bytes.len() / 2]).contains("truncated"));
    assert!(load_err(b"GGUF....").contains("not a csp-llava chat file"));
    let mut flipped = bytes.clone();
    flipped[8] = 9;
    assert!(load_err(&flipped).contains("version 9"));
    let mut damaged = bytes.clone();
    let n = damaged.len();
    damaged[n - 100..].fill(0xff);
    let err = load_err(&damaged);
    assert!(err.contains("damaged") && !err.contains('\n'), "{err}");
    let other = tempfile::tempdir().unwrap();
    csp_llava::gguf::tiny::write_all(other.path(), 1).unwrap();
    let mut mcfg = csp_llava::ModelConfig::new(other.path().join(csp_llava::gguf::tiny::TEXT_FILE), other.path().join(csp_llava::gguf::tiny::MMPROJ_FILE));
    mcfg.threads = 2;
    let err = Chat::load(Arc::new(Engine::load(&mcfg).unwrap()), &file, ChatConfig::default()).unwrap_err().to_string();
    assert!(err.contains("another model"), "{err}");
}

#[test]
fn a_long_chat_in_a_small_context_drops_its_oldest_turns_and_goes_on() {
    let engine = Arc::new(support::engine());
    let mut cfg = config(PolicyKind::Csp, 0.5);
    cfg.ctx.n_ctx = 256;
    let mut chat = Chat::new(engine, cfg);
    chat.add_image(support::image(0));
    chat.add_image(support::image(1));
    let mut last_cells = 0;
    for i in 0..24 {
        let a = chat.ask(&format!("Question number {i}: which image is red?"), &mut quiet).unwrap();
        assert_eq!(a.n_tokens, 8, "turn {i}");
        assert!(a.kv_cells <= 256, "turn {i}: {} cells", a.kv_cells);
        last_cells = a.kv_cells;
    }
    let s = chat.stats();
    assert_eq!(s.n_turns, 24);
    assert!(s.turns_evicted > 0, "the context filled up: {s:?}");
    assert!(last_cells >= s.cells_after_pruning, "the images' cells stay");
    assert_eq!(chat.transcript().len(), 48, "the transcript keeps every turn");
}
