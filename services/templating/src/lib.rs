//! Templates: compiled once (per batch, or per template version), rendered
//! per recipient with minijinja. Printing an undefined variable is an error (use
//! `{{ name | default("friend") }}` for a default; `{% if x %}` on a missing
//! `x` is false), HTML-escaped in the HTML
//! part. At compile time a `<style>` block is inlined into `style`
//! attributes for mail clients that ignore it, and a text part is derived
//! from the HTML when the template has none.
//!
//! Inlining parses the template as HTML, so template tags belong where HTML
//! allows text or attribute values (not between `<tr>`s of a table).

use std::collections::BTreeMap;

use ledger_schemas::{Content, MessageRendered, RecipientBatch};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct RenderFailure {
    pub code: &'static str,
    pub reason: String,
}

impl From<minijinja::Error> for RenderFailure {
    fn from(e: minijinja::Error) -> Self {
        let code = match e.kind() {
            minijinja::ErrorKind::UndefinedError => "undefined_variable",
            minijinja::ErrorKind::SyntaxError => "template_syntax",
            _ => "render_error",
        };
        // The detailed display names the template and line.
        RenderFailure { code, reason: format!("{e:#}") }
    }
}

/// The content of one batch, compiled once and rendered per recipient.
pub struct Templates {
    env: Environment<'static>,
    has: [bool; 3],
    json: Option<Value>,
}

/// Width of the text part derived from HTML.
const TEXT_WIDTH: usize = 78;

/// The HTML with its `<style>` rules moved into `style` attributes.
fn inline_css(html: &str) -> Result<String, RenderFailure> {
    if !html.contains("<style") {
        return Ok(html.to_owned());
    }
    let inliner = css_inline::CSSInliner::options().load_remote_stylesheets(false).build();
    inliner.inline(html).map_err(|e| RenderFailure { code: "css_inline", reason: e.to_string() })
}

fn text_from_html(html: &str) -> Result<String, RenderFailure> {
    html2text::from_read(html.as_bytes(), TEXT_WIDTH)
        .map_err(|e| RenderFailure { code: "text_from_html", reason: e.to_string() })
}

/// Renders every string inside `value` as a template (no HTML escaping:
/// the result is JSON, escaped by its serialiser).
fn render_json(
    env: &Environment<'static>,
    value: &Value,
    ctx: &BTreeMap<String, Value>,
) -> Result<Value, RenderFailure> {
    Ok(match value {
        Value::String(s) if s.contains("{{") || s.contains("{%") => Value::String(env.render_str(s, ctx)?),
        Value::Array(items) => Value::Array(items.iter().map(|v| render_json(env, v, ctx)).collect::<Result<_, _>>()?),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_json(env, v, ctx)?)))
                .collect::<Result<_, RenderFailure>>()?,
        ),
        other => other.clone(),
    })
}

const PARTS: [&str; 3] = ["subject.txt", "text.txt", "body.html"];

impl Templates {
    pub fn compile(content: &Content) -> Result<Templates, RenderFailure> {
        let mut env = Environment::new();
        // Printing a missing variable fails (no silent blanks in mail); testing
        // one in `{% if %}` is allowed and false.
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_auto_escape_callback(|name| if name.ends_with(".html") { AutoEscape::Html } else { AutoEscape::None });
        let html = content.html.as_deref().map(inline_css).transpose()?;
        let text = match (&content.text, &html) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(h)) => Some(text_from_html(h)?),
            (None, None) => None,
        };
        let sources = [content.subject.clone(), text, html];
        let mut has = [false; 3];
        for (i, source) in sources.into_iter().enumerate() {
            if let Some(src) = source {
                env.add_template_owned(PARTS[i], src)?;
                has[i] = true;
            }
        }
        Ok(Templates { env, has, json: content.json.clone() })
    }

    pub fn render(
        &self,
        batch: &RecipientBatch,
        recipient: &str,
        variables: &BTreeMap<String, Value>,
    ) -> Result<MessageRendered, RenderFailure> {
        let mut ctx = variables.clone();
        ctx.entry("recipient".to_owned()).or_insert_with(|| Value::from(recipient));
        let part = |i: usize| -> Result<Option<String>, RenderFailure> {
            if !self.has[i] {
                return Ok(None);
            }
            Ok(Some(self.env.get_template(PARTS[i])?.render(&ctx)?))
        };
        Ok(MessageRendered {
            channel: batch.channel,
            priority: batch.priority,
            recipient: recipient.to_owned(),
            from: batch.from.clone(),
            subject: part(0)?.map(|s| s.trim().to_owned()),
            text: part(1)?,
            html: part(2)?,
            json: self.json.as_ref().map(|v| render_json(&self.env, v, &ctx)).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_schemas::{Channel, Priority};

    fn batch(content: Content) -> RecipientBatch {
        RecipientBatch {
            template: None,
            batch_index: 0,
            batch_count: 1,
            channel: Channel::Email,
            priority: Priority::Transactional,
            from: None,
            content,
            recipients: vec![],
            send_at: None,
        }
    }

    #[test]
    fn variables_are_merged_and_html_is_escaped() {
        let content = Content {
            subject: Some("Hi {{ name }}".into()),
            text: Some("Hello {{ name }}".into()),
            html: Some("<p>{{ name }}</p>".into()),
            json: None,
        };
        let t = Templates::compile(&content).unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("name".into(), Value::from("<Ann>"));
        let r = t.render(&batch(content), "a@x.io", &vars).unwrap();
        assert_eq!(r.subject.as_deref(), Some("Hi <Ann>"));
        assert_eq!(r.text.as_deref(), Some("Hello <Ann>"));
        assert_eq!(r.html.as_deref(), Some("<p>&lt;Ann&gt;</p>"));
    }

    #[test]
    fn a_missing_variable_is_a_render_failure_not_an_empty_string() {
        let content = Content { subject: Some("Hi {{ name }}".into()), text: Some("x".into()), html: None, json: None };
        let t = Templates::compile(&content).unwrap();
        let err = t.render(&batch(content), "a@x.io", &BTreeMap::new()).unwrap_err();
        assert_eq!(err.code, "undefined_variable");
    }

    #[test]
    fn json_content_renders_its_string_leaves() {
        let content = Content {
            json: Some(serde_json::json!({"event": "order.{{ state }}", "n": 3, "tags": ["{{ state }}", "x"]})),
            ..Content::default()
        };
        let t = Templates::compile(&content).unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("state".into(), Value::from("shipped"));
        let r = t.render(&batch(content), "https://hooks.example.com/x", &vars).unwrap();
        assert_eq!(r.json, Some(serde_json::json!({"event": "order.shipped", "n": 3, "tags": ["shipped", "x"]})));
    }

    #[test]
    fn style_blocks_are_inlined_and_a_text_part_is_derived() {
        let content = Content {
            subject: Some("Hi".into()),
            html: Some(
                "<html><head><style>p.greet { color: red; }</style></head><body><p class=\"greet\">Hello {{ name | default(\"friend\") }}</p>{% if vip %}<p>VIP</p>{% endif %}<ul>{% for i in items %}<li>{{ i }}</li>{% endfor %}</ul></body></html>"
                    .into(),
            ),
            ..Content::default()
        };
        let t = Templates::compile(&content).unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("vip".into(), Value::from(true));
        vars.insert("items".into(), serde_json::json!(["a", "b"]));
        let r = t.render(&batch(content), "a@x.io", &vars).unwrap();
        let html = r.html.unwrap();
        assert!(html.contains(r#"<p class="greet" style="color: red;">Hello friend</p>"#), "{html}");
        assert!(html.contains("<li>a</li><li>b</li>") && html.contains("VIP"), "{html}");
        assert!(!html.contains("<style"), "{html}");
        let text = r.text.unwrap();
        assert!(text.contains("Hello friend") && text.contains("VIP"), "{text}");
    }

    #[test]
    fn a_syntax_error_is_reported_as_such() {
        let content = Content { subject: Some("Hi {{ name".into()), text: None, html: None, json: None };
        assert_eq!(Templates::compile(&content).err().unwrap().code, "template_syntax");
    }
}
