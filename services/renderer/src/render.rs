//! Template rendering with minijinja: strict about undefined variables, HTML
//! escaping on in the HTML part.

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
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|name| if name.ends_with(".html") { AutoEscape::Html } else { AutoEscape::None });
        let sources = [&content.subject, &content.text, &content.html];
        let mut has = [false; 3];
        for (i, source) in sources.iter().enumerate() {
            if let Some(src) = source {
                env.add_template_owned(PARTS[i], src.clone())?;
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
    fn a_syntax_error_is_reported_as_such() {
        let content = Content { subject: Some("Hi {{ name".into()), text: None, html: None, json: None };
        assert_eq!(Templates::compile(&content).err().unwrap().code, "template_syntax");
    }
}
