//! Chat templates rendered as Jinja (minijinja), the way Hugging Face transformers'
//! `apply_chat_template` and llama.cpp's `--jinja` render a GGUF's `tokenizer.chat_template`.
//!
//! What a template sees:
//! * `messages`: a list of `{role, content}` maps, the system message first when there is one
//!   (keys in that order, so `tojson` writes them as Python would);
//! * `add_generation_prompt = true`, `bos_token`, `eos_token` (the model's BOS/EOS token text),
//!   `tools = none`;
//! * the globals `raise_exception(msg)` (the render fails with one line naming `msg`) and
//!   `strftime_now(fmt)` (the current time, formatted as C's `strftime`; UTC — the library reads
//!   no time zone database);
//! * Python's string, dict and list methods (`.strip()`, `.startswith()`, `.split()`,
//!   `.items()`, `.get()`, …) through minijinja-contrib's pycompat;
//! * `tojson` as transformers defines it (`json.dumps`: `", "`/`": "` separators, non-ASCII kept,
//!   `indent`, `sort_keys`, `ensure_ascii`, `separators`);
//! * Jinja2's environment as transformers sets it: `trim_blocks` and `lstrip_blocks` on, one
//!   trailing newline dropped, no auto-escaping — so mtmd's `<__media__>` markers in the content
//!   pass through untouched.
//!
//! As llama.cpp does, a leading BOS text is removed from the result when the tokenizer adds BOS
//! itself (and a trailing EOS text when it adds EOS), so the prompt does not get two.

use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// The text (image markers included).
    pub content: String,
}

impl Message {
    pub(crate) fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
        }
    }
}

/// A message is a map with the keys `role` and `content`, in that order.
impl Object for Message {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role.as_str())),
            "content" => Some(Value::from(self.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// The model's special tokens, as the template and the tokenizer see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SpecialTokens {
    /// BOS token text (`bos_token`); empty when the model has none.
    pub bos: String,
    /// EOS token text (`eos_token`); empty when the model has none.
    pub eos: String,
    /// Whether tokenization adds BOS (then a leading `bos` is removed from the render).
    pub add_bos: bool,
    /// Whether tokenization adds EOS (then a trailing `eos` is removed from the render).
    pub add_eos: bool,
}

impl SpecialTokens {
    /// Reads the BOS/EOS texts and the add-BOS/EOS flags from the model's vocabulary.
    pub(crate) fn of(model: &crate::llama::Model) -> Self {
        // llama.cpp returns -1 for a missing token; token_bytes gives nothing for it.
        let text = |t: i32| String::from_utf8_lossy(&model.token_bytes(t, true)).into_owned();
        let ((bos, eos), (add_bos, add_eos)) = (model.bos_eos(), model.adds_bos_eos());
        Self { bos: text(bos), eos: text(eos), add_bos, add_eos }
    }
}

/// Whether `s` looks like a Jinja template (has a `{{ … }}` or `{% … %}` tag) rather than a name.
#[must_use]
pub(crate) fn looks_like_jinja(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// Renders `source` with `messages` (and `add_generation_prompt = true`). `origin` names the
/// template in errors ("--chat-template", "the model's tokenizer.chat_template").
///
/// # Errors
/// [`Error::Prompt`] with one line — the template's syntax error, an unknown filter or test, a
/// failed operation, or the message of the template's own `raise_exception` — and its line.
pub(crate) fn render(
    source: &str,
    origin: &str,
    messages: &[Message],
    special: &SpecialTokens,
) -> Result<String> {
    let fail = |e: &minijinja::Error| {
        Error::Prompt(format!(
            "cannot render the chat template ({origin}) as Jinja: {}",
            describe(e)
        ))
    };
    // A template is a program from a file: it runs on a thread of its own with a large stack
    // (deeply nested values print recursively), a bounded number of steps (fuel), a bounded
    // output, and a panic inside the engine becomes an error instead of ending the process.
    let (source, messages, special_c) = (source.to_owned(), messages.to_vec(), special.clone());
    let job = std::thread::Builder::new()
        .name("chat-template".into())
        .stack_size(RENDER_STACK)
        .spawn(move || -> std::result::Result<String, minijinja::Error> {
            let env = environment();
            let template = env.template_from_str(&source)?;
            let messages: Vec<Value> = messages.into_iter().map(Value::from_object).collect();
            let ctx = minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => special_c.bos.as_str(),
                eos_token => special_c.eos.as_str(),
                tools => Value::from(()),
            };
            let mut out = Bounded(Vec::new());
            template.render_captured_to(ctx, &mut out)?;
            String::from_utf8(out.0).map_err(|_| minijinja::Error::new(ErrorKind::InvalidOperation, "the output is not UTF-8"))
        })
        .map_err(|e| Error::Prompt(format!("cannot render the chat template ({origin}): {e}")))?;
    let text = match job.join() {
        Ok(r) => r.map_err(|e| fail(&e))?,
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| (*s).to_owned()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
            return Err(Error::Prompt(format!(
                "cannot render the chat template ({origin}) as Jinja: the template engine failed ({})",
                what.split_whitespace().collect::<Vec<_>>().join(" ")
            )));
        }
    };
    Ok(strip_specials(text, special))
}

/// Stack of the rendering thread (reserved, touched only as deep as a template goes).
const RENDER_STACK: usize = 256 << 20;
/// Steps a template may take: real chat templates take a few thousand per message.
const FUEL: u64 = 2_000_000;
/// The longest rendered prompt (a prompt file is at most 16 MiB).
const MAX_OUTPUT: usize = 32 << 20;
/// The deepest value `tojson` writes, and its widest indent.
const MAX_JSON_DEPTH: usize = 256;
const MAX_JSON_INDENT: usize = 64;

/// Render output that refuses to grow past [`MAX_OUTPUT`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other(format!("the rendered prompt is longer than {} MiB", MAX_OUTPUT >> 20)));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Removes a leading BOS / trailing EOS text the tokenizer will add anyway (as llama.cpp's
/// `common_chat_template_direct_apply` does).
fn strip_specials(mut text: String, special: &SpecialTokens) -> String {
    if special.add_bos && !special.bos.is_empty() && text.starts_with(&special.bos) {
        tracing::debug!(bos = %special.bos, "chat template: leading BOS removed (the tokenizer adds it)");
        text.drain(..special.bos.len());
    }
    if special.add_eos && !special.eos.is_empty() && text.ends_with(&special.eos) {
        tracing::debug!(eos = %special.eos, "chat template: trailing EOS removed (the tokenizer adds it)");
        text.truncate(text.len() - special.eos.len());
    }
    text
}

/// Prefix of the error detail `raise_exception` produces.
const RAISED: &str = "raise_exception: ";

/// The Jinja environment transformers uses (see the module docs).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    // minijinja's own `divisibleby` divides by zero (a panic); Jinja raises an error
    env.add_test("divisibleby", |v: i64, d: i64| -> std::result::Result<bool, minijinja::Error> {
        if d == 0 {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "divisibleby(0)"));
        }
        Ok(v.checked_rem(d).unwrap_or(0) == 0)
    });
    env
}

fn raise_exception(msg: Value) -> std::result::Result<Value, minijinja::Error> {
    let msg = msg.as_str().map_or_else(|| msg.to_string(), str::to_owned);
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

/// One line describing a minijinja error: what, the template's line, and any cause.
fn describe(e: &minijinja::Error) -> String {
    let mut s = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) if d.starts_with(RAISED) => {
            format!("the template raised an exception: {}", &d[RAISED.len()..])
        }
        (kind, Some(d)) => format!("{kind}: {d}"),
        (kind, None) => kind.to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// strftime_now

fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    strftime(fmt, secs)
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// C's `strftime` in the C locale, UTC, for `unix_secs`. Handles the common conversions
/// (`%Y %y %C %m %B %b %h %d %e %j %A %a %u %w %H %I %M %S %p %Z %z %F %T %D %R %c %x %X %n %t
/// %%`) and glibc's `-` flag (no padding: `%-d`); anything else is copied as written.
fn strftime(fmt: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let wday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[month as usize - 1] + day + u32::from(leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[month as usize - 1];

    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let pad = if chars.peek() == Some(&'-') {
            chars.next();
            false
        } else {
            true
        };
        let num = |v: i64, width: usize, fill: char| -> String {
            if !pad {
                v.to_string()
            } else if fill == ' ' {
                format!("{v:>width$}")
            } else {
                format!("{v:0>width$}")
            }
        };
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match spec {
            'Y' => year.to_string(),
            'y' => num(year.rem_euclid(100), 2, '0'),
            'C' => num(year.div_euclid(100), 2, '0'),
            'm' => num(i64::from(month), 2, '0'),
            'B' => month_name.to_owned(),
            'b' | 'h' => month_name[..3].to_owned(),
            'd' => num(i64::from(day), 2, '0'),
            'e' => num(i64::from(day), 2, ' '),
            'j' => num(i64::from(yday), 3, '0'),
            'A' => WEEKDAYS[wday].to_owned(),
            'a' => WEEKDAYS[wday][..3].to_owned(),
            'u' => (if wday == 0 { 7 } else { wday }).to_string(),
            'w' => wday.to_string(),
            'H' => num(hour, 2, '0'),
            'I' => num(hour12, 2, '0'),
            'M' => num(minute, 2, '0'),
            'S' => num(second, 2, '0'),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_owned(),
            'Z' => "UTC".to_owned(),
            'z' => "+0000".to_owned(),
            'F' => strftime("%Y-%m-%d", unix_secs),
            'T' | 'X' => strftime("%H:%M:%S", unix_secs),
            'D' | 'x' => strftime("%m/%d/%y", unix_secs),
            'R' => strftime("%H:%M", unix_secs),
            'c' => strftime("%a %b %e %H:%M:%S %Y", unix_secs),
            'n' => "\n".to_owned(),
            't' => "\t".to_owned(),
            '%' => "%".to_owned(),
            other => format!("%{}{other}", if pad { "" } else { "-" }),
        };
        out.push_str(&piece);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// tojson, as transformers' `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
// sort_keys=False)`

struct Json {
    /// Per-level indent; `None` = one line.
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => " ".repeat(usize::try_from(v.as_i64().unwrap_or(0)).unwrap_or(0).min(MAX_JSON_INDENT + 1)),
        }),
    };
    if indent.as_ref().is_some_and(|i| i.len() > MAX_JSON_INDENT) {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: an indent of more than {MAX_JSON_INDENT}")));
    }
    let (mut item_sep, mut key_sep) = (
        if indent.is_some() { "," } else { ", " }.to_owned(),
        ": ".to_owned(),
    );
    if let Some(seps) = kwargs.get::<Option<Value>>("separators")? {
        if !seps.is_none() {
            let parts: Vec<String> = seps
                .try_iter()?
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect();
            if let [i, k] = parts.as_slice() {
                (item_sep, key_sep) = (i.clone(), k.clone());
            }
        }
    }
    let json = Json {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    json.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

impl Json {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(
        &self,
        out: &mut String,
        v: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        if depth > MAX_JSON_DEPTH {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: a value nested deeper than {MAX_JSON_DEPTH}")));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match f64::try_from(v.clone()) {
                Ok(f) if !v.is_integer() && f.is_nan() => out.push_str("NaN"),
                Ok(f) if !v.is_integer() && f.is_infinite() => {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                }
                _ => out.push_str(&v.to_string()),
            },
            ValueKind::String | ValueKind::Bytes | ValueKind::Plain | ValueKind::Invalid => {
                let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                self.string(out, &s);
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, '[', ']', &items, depth, |out, item| {
                    self.write(out, item, depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(out, '{', '}', &keys, depth, |out, key| {
                    let k = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                    self.string(out, &k);
                    out.push_str(&self.key_sep);
                    self.write(out, &v.get_item(key)?, depth + 1)
                })?;
            }
            // future kinds: their string form
            #[allow(unreachable_patterns)]
            _ => self.string(out, &v.to_string()),
        }
        Ok(())
    }

    fn container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: &[Value],
        depth: usize,
        mut each: impl FnMut(&mut String, &Value) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, depth + 1);
            each(out, item)?;
        }
        self.newline(out, depth);
        out.push(close);
        Ok(())
    }

    /// A JSON string as Python writes it.
    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn special() -> SpecialTokens {
        SpecialTokens {
            bos: "<s>".into(),
            eos: "</s>".into(),
            add_bos: false,
            add_eos: false,
        }
    }

    fn chat(system: Option<&str>, user: &str) -> Vec<Message> {
        let mut m = Vec::new();
        if let Some(s) = system {
            m.push(Message::new("system", s));
        }
        m.push(Message::new("user", user));
        m
    }

    fn ok(src: &str, msgs: &[Message]) -> String {
        render(src, "test", msgs, &special()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Asserts a one-line error that contains every needle.
    #[track_caller]
    fn fails(src: &str, msgs: &[Message], needles: &[&str]) -> String {
        let e = render(src, "test", msgs, &special())
            .expect_err("render must fail")
            .to_string();
        eprintln!("{e}");
        assert!(
            !e.contains('\n') && !e.contains('\r'),
            "one line expected: {e:?}"
        );
        for n in needles {
            assert!(e.contains(n), "expected {n:?} in {e:?}");
        }
        e
    }

    /// transformers' ChatML (Qwen-style default system prompt).
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_and_without_system() {
        assert_eq!(
            ok(CHATML, &chat(None, "<__media__>\nWhat is this?")),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<__media__>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ok(CHATML, &chat(Some("Be brief."), "hi")),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Llama-3's template: bos_token on the first message, `| trim`, loop.index0, `set`.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    #[test]
    fn llama3_style_with_bos_and_trim() {
        assert_eq!(
            ok(LLAMA3, &chat(Some(" Be brief. "), "  <__media__> hi\n")),
            "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<__media__> hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    /// Gemma-style: the system message folded into the first user turn, `raise_exception` on a
    /// bad role order, `.strip()` (a Python method), loop.first / loop.last.
    const GEMMA: &str = "{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'].strip() + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'].strip() + '<end_of_turn>\n' }}
    {%- if loop.last and message['role'].startswith('user') -%}{{ '<!-- last -->' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
";

    #[test]
    fn gemma_style_folds_the_system_message() {
        assert_eq!(
            ok(GEMMA, &chat(Some("Be brief. "), "<__media__>\nDescribe.")),
            "<s><start_of_turn>user\nBe brief.\n\n<__media__>\nDescribe.<end_of_turn>\n<!-- last --><start_of_turn>model\n"
        );
        assert_eq!(
            ok(GEMMA, &chat(None, "hi")),
            "<s><start_of_turn>user\nhi<end_of_turn>\n<!-- last --><start_of_turn>model\n"
        );
    }

    #[test]
    fn raise_exception_is_one_line_naming_the_message() {
        let msgs = vec![
            Message::new("assistant", "first"),
            Message::new("user", "then"),
        ];
        let e = fails(
            GEMMA,
            &msgs,
            &["Conversation roles must alternate user/assistant", "test"],
        );
        assert!(e.contains("raised"), "{e}");
        // a message with a newline still gives one line
        fails(
            "{{ raise_exception('bad\nthing') }}",
            &chat(None, "x"),
            &["bad thing"],
        );
    }

    #[test]
    fn template_errors_are_one_line() {
        let m = chat(None, "x");
        fails("{{ messages | no_such_filter }}", &m, &["unknown filter"]);
        fails(
            "{% for m in messages %}{{ m.content }}",
            &m,
            &["syntax error"],
        );
        fails(
            "{{ messages[0].content.no_such_method() }}",
            &m,
            &["unknown method"],
        );
        fails("{% if %}\n\n{% endif %}", &m, &["line 1"]);
    }

    #[test]
    fn python_methods_and_items() {
        let m = chat(Some("sys"), " a,b ,c ");
        assert_eq!(
            ok(
                "{{ messages[1].content.strip().split(',') | join('|') }}",
                &m
            ),
            "a|b |c"
        );
        assert_eq!(
            ok(
                "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}",
                &m
            ),
            "role=system;content=sys;"
        );
        assert_eq!(ok("{{ messages[0].get('name', 'none') }}", &m), "none");
        assert_eq!(
            ok(
                "{{ messages[0].content.upper() }}{% if 'x'.endswith('x') %}!{% endif %}",
                &m
            ),
            "SYS!"
        );
        assert_eq!(
            ok(
                "{% if tools is none and add_generation_prompt %}{{ eos_token }}{% endif %}",
                &m
            ),
            "</s>"
        );
    }

    #[test]
    fn loop_controls_and_namespace() {
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ loop.index }}{% endfor %}:{{ ns.n }}";
        assert_eq!(ok(src, &chat(Some("s"), "u")), "2:1");
    }

    #[test]
    fn trim_and_lstrip_blocks_as_transformers() {
        // trim_blocks eats the newline after a tag; lstrip_blocks the indent before one;
        // the last trailing newline is dropped.
        let src = "{% for m in messages %}\n    {% if true %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(ok(src, &chat(Some("s"), "u")), "[system]\n[user]\n");
    }

    #[test]
    fn tojson_writes_like_python() {
        let m = chat(None, "é \"q\"\n<__media__>");
        assert_eq!(
            ok("{{ messages[0] | tojson }}", &m),
            r#"{"role": "user", "content": "é \"q\"\n<__media__>"}"#
        );
        assert_eq!(
            ok("{{ [1, 2.5, none, true] | tojson }}", &m),
            "[1, 2.5, null, true]"
        );
        assert_eq!(
            ok(
                "{{ {'b': 1, 'a': [1]} | tojson(indent=2, sort_keys=true) }}",
                &m
            ),
            "{\n  \"a\": [\n    1\n  ],\n  \"b\": 1\n}"
        );
        assert_eq!(
            ok("{{ 'é' | tojson(ensure_ascii=true) }}", &m),
            r#""\u00e9""#
        );
        assert_eq!(ok("{{ [] | tojson(indent=2) }}", &m), "[]");
    }

    #[test]
    fn strftime_formats_like_c() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year
        let t = 1_721_952_000 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A, %B %-d, %Y %I:%M:%S %p", t),
            "Friday, July 26, 2024 01:05:09 PM"
        );
        assert_eq!(
            strftime("%F %T %j %u %w %y %% %Q", t),
            "2024-07-26 13:05:09 208 5 5 24 % %Q"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
        assert_eq!(strftime("%e|%c", 86_400 * 3), " 4|Sun Jan  4 00:00:00 1970");
        let now = ok("{{ strftime_now('%Y') }}", &chat(None, "x"));
        assert!(now.len() == 4 && now.starts_with('2'), "{now}");
    }

    #[test]
    fn bos_and_eos_the_tokenizer_adds_are_removed() {
        let sp = SpecialTokens {
            add_bos: true,
            add_eos: true,
            ..special()
        };
        let src = "{{ bos_token }}[{{ messages[0].content }}]{{ eos_token }}";
        assert_eq!(render(src, "t", &chat(None, "x"), &sp).unwrap(), "[x]");
        assert_eq!(
            render(src, "t", &chat(None, "x"), &special()).unwrap(),
            "<s>[x]</s>"
        );
    }

    #[test]
    fn jinja_detection() {
        assert!(looks_like_jinja("{{ x }}"));
        assert!(looks_like_jinja("{% if x %}{% endif %}"));
        assert!(!looks_like_jinja("chatml"));
        assert!(!looks_like_jinja("llama2-sys"));
    }
}
