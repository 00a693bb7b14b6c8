//! Text + images → chat-formatted prompt → mtmd chunks → spans.

use std::path::Path;


use super::image::{self, ImageLimits};
use super::template::{self, Message, SpecialTokens};
use crate::config::{ImageData, Request, DEFAULT_IMAGE_LABEL};
use crate::error::{Error, Result};
use crate::llama::{marker as mtmd_default_marker, Bitmap, ChatFormatError, ChatMessage, ChunkKind, Chunks, Model, Mtmd};
use crate::span::{media_tokens, Modality, Span};

/// LLaVA's image marker, accepted in prompts besides mtmd's own `<__media__>`.
pub const IMAGE_MARKER: &str = "<image>";

/// A tokenized prompt, ready to evaluate.
pub struct Prompt {
    /// The text after the chat template, with media markers.
    pub text: String,
    /// mtmd chunks (text runs and image embeddings to compute).
    pub chunks: Chunks,
    /// One span per chunk evaluated by the prefill (and considered by pruning).
    pub spans: Vec<Span>,
    /// Spans held back by [`Prompt::defer_question`]: evaluated after pruning.
    pub deferred: Vec<Span>,
    /// Tokens per image, in `--image` order.
    pub image_tokens: Vec<usize>,
    /// The images' paths as given, in `--image` order (for messages).
    pub image_names: Vec<String>,
}

impl std::fmt::Debug for Prompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompt")
            .field("n_tokens", &self.n_tokens())
            .field("spans", &self.spans)
            .field("image_tokens", &self.image_tokens)
            .finish_non_exhaustive()
    }
}

impl Prompt {
    /// All prompt tokens (KV cells), image tokens included.
    #[must_use]
    pub fn n_tokens(&self) -> usize {
        self.spans.last().map_or(0, |s| s.tokens.end)
    }
    /// Positions the prompt occupies.
    #[must_use]
    pub fn n_positions(&self) -> i32 {
        self.spans.last().map_or(0, |s| s.pos.end)
    }
    /// Number of images.
    #[must_use]
    pub fn n_images(&self) -> usize {
        self.image_tokens.len()
    }

    /// Holds back the final text chunk (the question and the assistant prefix after the last
    /// image), so the images are read, observed and pruned first and the question is then asked
    /// of the pruned cache — the way a cached multi-image context is queried. Returns false
    /// (and changes nothing) when the prompt has no image before its final text.
    pub fn defer_question(&mut self) -> bool {
        let n = self.spans.len();
        if n < 2 || self.spans[n - 1].modality != crate::span::Modality::Text || !self.spans[..n - 1].iter().any(|s| s.media.is_some()) {
            return false;
        }
        let last = self.spans.pop().expect("n ≥ 2");
        self.deferred.push(last);
        true
    }

    /// Modality of every prompt token.
    #[must_use]
    pub fn token_modalities(&self) -> Vec<crate::span::Modality> {
        let mut out = Vec::with_capacity(self.n_tokens());
        for s in &self.spans {
            out.extend(std::iter::repeat_n(s.modality, s.n_tokens()));
        }
        out
    }

    /// Image index of every prompt token (`None` for text).
    #[must_use]
    pub fn token_media(&self) -> Vec<Option<usize>> {
        let mut out = Vec::with_capacity(self.n_tokens());
        for s in &self.spans {
            out.extend(std::iter::repeat_n(s.media, s.n_tokens()));
        }
        out
    }

    /// Position of every prompt token, when each token has its own position (1-D RoPE);
    /// `None` under M-RoPE, where an image's tokens share positions.
    #[must_use]
    pub fn positions(&self) -> Option<Vec<i32>> {
        let mut out = Vec::with_capacity(self.n_tokens());
        for s in &self.spans {
            if s.pos.len() != s.tokens.len() {
                return None;
            }
            out.extend(s.pos.clone());
        }
        Some(out)
    }
}

/// Places media markers: `<image>` becomes mtmd's marker; without markers the images come first,
/// one per line, in order, each after its `label` (`{k}` = its number) when there are two or
/// more. Returns the text and checks the marker count.
pub(crate) fn place_markers(prompt: &str, n_images: usize, label: &str) -> Result<String> {
    let marker = mtmd_default_marker();
    let text = prompt.replace(IMAGE_MARKER, marker);
    let n_markers = text.matches(marker).count();
    if n_markers == 0 {
        let mut out = String::with_capacity(text.len() + n_images * (marker.len() + label.len() + 3));
        for k in 1..=n_images {
            if n_images > 1 {
                out.push_str(&label.replace("{k}", &k.to_string()));
            }
            out.push_str(marker);
            out.push('\n');
        }
        out.push_str(&text);
        return Ok(out);
    }
    if n_markers != n_images {
        return Err(Error::Prompt(format!(
            "the prompt has {n_markers} image marker(s) (<image> or {marker}) but {n_images} image(s) were given"
        )));
    }
    Ok(text)
}

/// Applies the chat template to the system message (if any) and the user's prompt, with the
/// assistant's turn opened. The rules, first match wins:
///
/// 1. `raw` (`--no-chat-template`): the prompt as it is.
/// 2. `chat_template` is a Jinja template (contains `{{` or `{%`: `--chat-template '<tmpl>'`,
///    `--chat-template-file`): rendered with minijinja as transformers does ([`template`]).
/// 3. `chat_template` is anything else: one of llama.cpp's built-in names (`chatml`, `vicuna`,
///    `llama2`, …) → llama.cpp's own formatter; any other name → an error listing the names.
///    (`--jinja` does not change this: a name has no Jinja source to render.)
/// 4. No `chat_template`: the model's `tokenizer.chat_template` (none → an error). With `jinja`
///    (`--jinja`) it is rendered with minijinja; otherwise llama.cpp formats it (it recognises
///    common templates by their markers), and a template llama.cpp does not recognise is
///    rendered with minijinja instead — so a GGUF with a custom template still works.
///
/// Image markers (`<__media__>`) in the prompt pass through every path untouched.
fn format_chat(model: &Model, req: &Request, user: String) -> Result<String> {
    if req.raw {
        return Ok(user);
    }
    format_messages(model, req, &[Message::new("user", user)])
}

/// The conversation `turns` (user and assistant messages, after `req.system` when set) through
/// the chat template `req` selects, ending with the assistant's generation prompt.
pub(crate) fn format_messages(model: &Model, req: &Request, turns: &[Message]) -> Result<String> {
    let mut messages = Vec::with_capacity(turns.len() + 1);
    if let Some(system) = &req.system {
        messages.push(Message::new("system", system.as_str()));
    }
    messages.extend(turns.iter().cloned());

    let (text, via) = match &req.chat_template {
        Some(t) if template::looks_like_jinja(t) => {
            let origin = if req.jinja { "--chat-template-file / --jinja" } else { "--chat-template" };
            (template::render(t, origin, &messages, &SpecialTokens::of(model))?, "jinja")
        }
        Some(name) => {
            let names = crate::llama::chat_builtin_templates();
            if !names.iter().any(|n| n == name) {
                // one line whatever the name holds: control characters escaped, long names cut
                let shown: String = name.chars().take(60).flat_map(char::escape_debug).collect();
                let more = if name.chars().count() > 60 { "…" } else { "" };
                return Err(Error::Config {
                    field: "chat_template",
                    reason: format!(
                        "unknown template '{shown}{more}': neither a Jinja template (no {{{{ or {{%) nor one of llama.cpp's built-in names ({})",
                        names.join(", ")
                    ),
                });
            }
            let text = apply_builtin(model, name.as_bytes(), &messages)?.map_err(|e| {
                Error::Prompt(format!("llama.cpp cannot apply its built-in chat template '{name}' ({e})"))
            })?;
            (text, "llama.cpp built-in")
        }
        None => {
            let tmpl = model.chat_template().ok_or_else(|| {
                Error::Prompt(
                    "the model has no chat template; pass --chat-template NAME (vicuna for LLaVA-1.5, chatml, llama2, …), --chat-template-file FILE or --no-chat-template".into(),
                )
            })?;
            let origin = "the model's tokenizer.chat_template";
            let source = || {
                String::from_utf8(tmpl.clone()).map_err(|_| Error::Prompt("the model's chat template is not UTF-8".into()))
            };
            if req.jinja {
                (template::render(&source()?, origin, &messages, &SpecialTokens::of(model))?, "jinja")
            } else {
                match apply_builtin(model, &tmpl, &messages)? {
                    Ok(text) => (text, "llama.cpp"),
                    Err(e) => {
                        tracing::debug!(
                            error = %e,
                            "llama.cpp does not recognise the model's chat template; rendering it with minijinja"
                        );
                        let origin = "the model's tokenizer.chat_template, which llama.cpp's formats do not recognise";
                        (template::render(&source()?, origin, &messages, &SpecialTokens::of(model))?, "jinja")
                    }
                }
            }
        }
    };
    tracing::debug!(via, prompt = ?text, "chat template applied");
    Ok(text)
}

/// llama.cpp's formatter (`llama_chat_apply_template`): the outer `Result` fails on a NUL byte
/// in a message, the inner one when llama.cpp cannot apply the template (it does not know it).
fn apply_builtin(model: &Model, tmpl: &[u8], messages: &[Message]) -> Result<std::result::Result<String, ChatFormatError>> {
    let chat: Vec<ChatMessage<'_>> = messages.iter().map(|m| ChatMessage { role: &m.role, content: &m.content }).collect();
    match model.apply_chat_template(tmpl, &chat) {
        Err(ChatFormatError::Nul(what)) => Err(Error::Prompt(format!("the {what} contains a NUL byte"))),
        other => Ok(other),
    }
}

/// Reads and decodes one image ([`super::image::load`]: bounded read, pixel limit checked on the
/// header, EXIF orientation, RGB8) and hands mtmd its pixels; the decoded buffer is dropped as soon
/// as mtmd holds its copy.
fn load_image(path: &Path, index: usize, limits: &ImageLimits) -> Result<Bitmap> {
    let img = image::load(path, limits)?;
    let bitmap = Bitmap::from_rgb(img.width, img.height, &img.rgb, &media_id(index))
        .map_err(|e| Error::Image { name: path.display().to_string(), reason: format!("mtmd refused its {} × {} pixels ({e})", img.width, img.height) })?;
    drop(img);
    Ok(bitmap)
}

/// Declared size of an in-memory image, checked against the limits like a file's header.
fn image_data_size(d: &ImageData, limits: &ImageLimits) -> Result<(u32, u32)> {
    match d {
        ImageData::File(p) => image::probe_file(p, limits),
        ImageData::Encoded { name, bytes } => image::probe(bytes, limits).map_err(|e| image::data_error(name, e)),
        ImageData::Rgb { name, width, height, rgb } => {
            let want = u64::from(*width) * u64::from(*height) * 3;
            if *width == 0 || *height == 0 || rgb.len() as u64 != want {
                return Err(Error::Image { name: name.clone(), reason: format!("{} bytes of RGB for {width} × {height} pixels (need {want})", rgb.len()) });
            }
            if u64::from(*width) * u64::from(*height) > limits.max_pixels {
                return Err(Error::Image { name: name.clone(), reason: format!("{width} × {height} pixels is over the limit of {} pixels", limits.max_pixels) });
            }
            Ok((*width, *height))
        }
    }
}

/// [`load_image`] for an image in memory.
fn load_image_data(d: &ImageData, index: usize, limits: &ImageLimits) -> Result<Bitmap> {
    if let ImageData::File(p) = d {
        return load_image(p, index, limits);
    }
    let (width, height) = image_data_size(d, limits)?;
    let bitmap = match d {
        ImageData::Encoded { name, bytes } => {
            let img = image::decode(bytes, limits).map_err(|e| image::data_error(name, e))?;
            Bitmap::from_rgb(img.width, img.height, &img.rgb, &media_id(index))
        }
        ImageData::Rgb { rgb, .. } => Bitmap::from_rgb(width, height, rgb, &media_id(index)),
        ImageData::File(_) => unreachable!("files are loaded above"),
    };
    bitmap.map_err(|e| Error::Image { name: d.name(), reason: format!("mtmd refused it ({e})") })
}

/// The context a prompt must fit (`-c`, or the trained context for `-c 0`), checked before any
/// image is decoded; see [`check_fits`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fit {
    /// Context size.
    pub n_ctx: u32,
    /// The model's trained context (for the message).
    pub n_ctx_train: u32,
}

/// Refuses, before decoding any image, a prompt that cannot fit `fit`: mtmd counts the prompt's
/// tokens from the images' declared sizes alone ([`crate::llama::count_prompt`]), so 40 photos
/// that cannot fit `-c` cost 40 header reads, not 40 decodes. The images are probed in order
/// (each path once), so an unreadable, non-image or oversized file is reported here too. When
/// mtmd cannot count (it then fails the same way on the real images), nothing is refused here.
fn check_fits(mtmd: &Mtmd, req: &Request, text: &str, limits: &ImageLimits, fit: Fit) -> Result<()> {
    let mut seen: std::collections::HashMap<&Path, (u32, u32)> = std::collections::HashMap::new();
    let mut sizes = Vec::with_capacity(req.n_images());
    for p in &req.images {
        let size = match seen.get(p.as_path()) {
            Some(&s) => s,
            None => {
                let s = image::probe_file(p, limits)?;
                seen.insert(p.as_path(), s);
                s
            }
        };
        sizes.push(size);
    }
    for d in &req.image_data {
        sizes.push(image_data_size(d, limits)?);
    }
    let Some(count) = mtmd.count_prompt(text, true, &sizes) else {
        return Ok(());
    };
    if count.n_tokens > fit.n_ctx as usize || count.n_positions > i64::from(fit.n_ctx) {
        return Err(Error::PromptTooLong {
            n_tokens: count.n_tokens,
            n_image_tokens: count.media_tokens.iter().sum(),
            n_images: req.n_images(),
            n_ctx: fit.n_ctx,
            n_ctx_train: fit.n_ctx_train,
        });
    }
    Ok(())
}

fn media_id(index: usize) -> String {
    format!("csp-media-{index}")
}

fn media_index(id: &str) -> Option<usize> {
    id.strip_prefix("csp-media-")?.parse().ok()
}

/// Builds the prompt: template, markers, images, tokenization, spans. With `fit`, a prompt that
/// cannot fit that context is refused before any image is decoded ([`check_fits`]). Images are
/// decoded one at a time, each into mtmd's bitmap, and all bitmaps are dropped once mtmd has
/// tokenized them (its chunks keep the preprocessed pixels only).
pub(crate) fn build(model: &Model, mtmd: &Mtmd, req: &Request, fit: Option<Fit>) -> Result<Prompt> {
    if req.prompt.trim().is_empty() {
        return Err(Error::Prompt("the prompt is empty (give one with -p or -f)".into()));
    }
    if req.n_images() > 0 && !mtmd.supports_vision() {
        return Err(Error::Unsupported {
            what: "input",
            reason: "the projector has no vision encoder, so it cannot take --image".into(),
        });
    }
    let limits = ImageLimits::new(req.max_image_pixels)?;
    let label = req.image_label.as_deref().unwrap_or(DEFAULT_IMAGE_LABEL);
    if label.contains(IMAGE_MARKER) || label.contains(mtmd_default_marker()) {
        return Err(Error::Config { field: "image_label", reason: "the image label may not contain an image marker".into() });
    }
    let user = place_markers(&req.prompt, req.n_images(), label)?;
    let text = format_chat(model, req, user)?;
    // a system message with a marker, or a template that drops or repeats the user's turn,
    // would otherwise reach mtmd as its "image preprocessing error"
    let n_markers = text.matches(mtmd_default_marker()).count();
    if n_markers != req.n_images() {
        return Err(Error::Prompt(format!(
            "after the chat template the prompt has {n_markers} image marker(s) for {} image(s): the system message or the template adds, drops or repeats them",
            req.n_images()
        )));
    }
    if let (Some(fit), true) = (fit, req.n_images() > 0) {
        check_fits(mtmd, req, &text, &limits, fit)?;
    }
    let n_files = req.images.len();
    let bitmaps = req
        .images
        .iter()
        .enumerate()
        .map(|(i, p)| load_image(p, i, &limits))
        .chain(req.image_data.iter().enumerate().map(|(i, d)| load_image_data(d, n_files + i, &limits)))
        .collect::<Result<Vec<_>>>()?;
    let chunks = mtmd.tokenize(&text, &bitmaps)?;
    drop(bitmaps);

    let mut spans = Vec::with_capacity(chunks.len());
    let (mut tok, mut pos) = (0usize, 0i32);
    for i in 0..chunks.len() {
        let c = chunks.get(i).expect("index below len");
        let modality = match c.kind() {
            ChunkKind::Text => Modality::Text,
            ChunkKind::Image => Modality::Image,
            ChunkKind::Audio => Modality::Audio,
        };
        let media = match modality {
            Modality::Text => None,
            _ => c.id().as_deref().and_then(media_index),
        };
        let (n, p) = (c.n_tokens(), c.n_positions());
        spans.push(Span { modality, media, tokens: tok..tok + n, pos: pos..pos + p });
        tok += n;
        pos += p;
    }
    if spans.last().is_some_and(|s| s.modality != Modality::Text) {
        return Err(Error::Prompt(
            "the prompt ends with an image; add text after the last image marker".into(),
        ));
    }
    let image_tokens = media_tokens(&spans, req.n_images());
    let image_names = req.images.iter().map(|p| p.display().to_string()).chain(req.image_data.iter().map(ImageData::name)).collect();
    Ok(Prompt { text, chunks, spans, deferred: Vec::new(), image_tokens, image_names })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers() {
        let m = mtmd_default_marker();
        assert_eq!(place_markers("hi", 2, "").unwrap(), format!("{m}\n{m}\nhi"));
        assert_eq!(place_markers("hi", 2, DEFAULT_IMAGE_LABEL).unwrap(), format!("Image 1: {m}\nImage 2: {m}\nhi"));
        assert_eq!(place_markers("hi", 1, DEFAULT_IMAGE_LABEL).unwrap(), format!("{m}\nhi"), "one image: no label");
        assert_eq!(place_markers("a <image> b <image>", 2, DEFAULT_IMAGE_LABEL).unwrap(), format!("a {m} b {m}"), "the user's markers: no labels");
        assert_eq!(place_markers(&format!("x {m}"), 1, "").unwrap(), format!("x {m}"));
        assert!(place_markers("a <image>", 2, "").is_err());
        assert_eq!(place_markers("no images", 0, DEFAULT_IMAGE_LABEL).unwrap(), "no images");
        assert_eq!(media_index(&media_id(12)), Some(12));
    }
}
