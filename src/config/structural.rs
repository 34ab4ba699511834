//! Reads the config's JSON value into the raw serde types while collecting every structural
//! problem (unknown field, wrong type, missing field), not just the first one serde stops at.
//! Each problem is noted, the value that caused it is taken out (or a stand-in is put where a
//! required one is missing), and deserialization runs again, so one `keyward check` lists them all.

use serde_json::Value;
use serde_path_to_error::Segment;

use super::raw::RawConfig;
use super::spans::SpanIndex;
use super::{Problem, suggest};

/// Enough for any real config; a bound so a value that cannot be repaired cannot loop.
const MAX_ROUNDS: usize = 256;

/// What a structurally broken config still yields.
pub struct Parsed {
    /// The raw config with every broken value removed or stood in for; `None` when it could
    /// not be repaired (the problems then say why).
    pub raw: Option<RawConfig>,
    pub problems: Vec<Problem>,
    /// The field paths that were repaired: later problems at or below them are consequences of
    /// the repair (a stand-in value, a default), not news, and are dropped.
    pub repaired: Vec<String>,
    /// Entries that needed a repair and the names they define.
    broken: Vec<(String, Vec<String>)>,
}

impl Parsed {
    /// Whether `field` is at or below a repaired path.
    pub fn covers(&self, field: &str) -> bool {
        self.repaired.iter().any(|r| is_within(field, r))
    }

    /// Whether a validation problem only follows from a structural one: it is at a repaired
    /// field, or it is elsewhere and is about (first quotes `'name'`) something a broken entry
    /// defines, such as a grant naming a route whose `prefix` is missing. That route was
    /// reported already.
    pub fn is_consequence(&self, problem: &Problem) -> bool {
        let subject = problem.message.split('\'').nth(1);
        self.covers(&problem.field)
            || self.broken.iter().any(|(entry, names)| {
                !is_within(&problem.field, entry) && names.iter().any(|n| Some(n.as_str()) == subject)
            })
    }
}

/// The entries (`routes[1]`, `roles.worker`, ...) that needed a repair, with the names they
/// define for others to refer to.
fn broken_entries(value: &Value, repaired: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for path in repaired {
        let entry = match path.split_once(']') {
            Some((head, _)) if ["routes[", "sources[", "agents["].iter().any(|s| head.starts_with(s)) => {
                format!("{head}]")
            }
            _ => match path.strip_prefix("roles.") {
                Some(rest) => format!("roles.{}", rest.split(['.', '[']).next().unwrap_or_default()),
                None => continue,
            },
        };
        if out.iter().any(|(e, _)| *e == entry) {
            continue;
        }
        let mut names = Vec::new();
        if let Some(role) = entry.strip_prefix("roles.") {
            names.push(role.to_string());
        } else if let Some((section, index)) = entry.trim_end_matches(']').split_once('[') {
            let item = index.parse::<usize>().ok().and_then(|i| value.get(section)?.get(i));
            let name = item.and_then(|i| i.get("name").or_else(|| i.get("id"))).and_then(Value::as_str);
            names.extend(name.filter(|n| !n.is_empty()).map(str::to_string));
            // A source defines the secret names of its mapping.
            if let Some(mapping) = item.and_then(|i| i.get("mapping")).and_then(Value::as_object) {
                names.extend(mapping.keys().cloned());
            }
        }
        out.push((entry, names));
    }
    out
}

pub fn parse(mut value: Value, index: &SpanIndex, file: &str) -> Parsed {
    let mut parsed = Parsed { raw: None, problems: Vec::new(), repaired: Vec::new(), broken: Vec::new() };
    let mut last: Option<(String, String)> = None;
    for _ in 0..MAX_ROUNDS {
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(value.clone()) {
            Ok(raw) => {
                parsed.raw = Some(raw);
                parsed.broken = broken_entries(&value, &parsed.repaired);
                return parsed;
            }
            Err(error) => error,
        };
        let steps: Option<Vec<Step>> = error.path().iter().map(Step::of).collect();
        let path = match error.path().to_string() {
            dot if dot == "." => String::new(),
            path => path,
        };
        let raw_message = error.inner().to_string();
        let (field, message) = locate(&path, &raw_message);
        let seen = (field.clone(), raw_message.clone());
        if last.as_ref() == Some(&seen) {
            // The repair did not move the error on: stop here rather than loop.
            return parsed;
        }
        last = Some(seen);
        if !parsed.covers(&field) {
            parsed.problems.push(Problem {
                file: file.to_string(),
                line: index.line_of(&field),
                field: field.clone(),
                message,
            });
        }
        parsed.repaired.push(field);
        let Some(steps) = steps else { return parsed };
        if !repair(&mut value, &steps, &raw_message) {
            return parsed;
        }
    }
    parsed
}

/// One step of a path into the JSON value.
#[derive(Debug, Clone)]
enum Step {
    Index(usize),
    Key(String),
}

impl Step {
    fn of(segment: &Segment) -> Option<Step> {
        match segment {
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Enum { .. } | Segment::Unknown => None,
        }
    }
}

fn is_within(field: &str, parent: &str) -> bool {
    parent.is_empty()
        || field == parent
        || field.strip_prefix(parent).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// The name inside the first pair of backticks of a serde message.
fn quoted(message: &str) -> Option<&str> {
    message.split('`').nth(1)
}

/// The field a serde error is about, and the message to show for it.
fn locate(path: &str, message: &str) -> (String, String) {
    if message.contains("untagged enum OneOrMany") {
        return (path.to_string(), "expected a string or a list of strings".to_string());
    }
    if let Some(unknown) = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
        // serde names the parent; point at the field itself.
        let already_named = path == unknown || path.ends_with(&format!(".{unknown}"));
        let field = if already_named { path.to_string() } else { join(path, unknown) };
        let expected: Vec<&str> = message.split('`').skip(3).step_by(2).collect();
        let message = match suggest(unknown, expected.iter().copied()) {
            Some(near) => format!("{message} (did you mean `{near}`?)"),
            None => message.to_string(),
        };
        return (field, message);
    }
    if message.starts_with("missing field `") {
        let missing = quoted(message).unwrap_or_default();
        return (join(path, missing), message.to_string());
    }
    (path.to_string(), message.to_string())
}

fn at_mut<'v>(value: &'v mut Value, steps: &[Step]) -> Option<&'v mut Value> {
    steps.iter().try_fold(value, |v, step| match step {
        Step::Index(i) => v.get_mut(*i),
        Step::Key(k) => v.get_mut(k.as_str()),
    })
}

/// Values tried in place of one that is missing or of the wrong type, simplest first.
fn stand_ins() -> [Value; 5] {
    [Value::Object(Default::default()), Value::String(String::new()), Value::Array(Vec::new()), 0.into(), false.into()]
}

/// Takes out (or stands in for) the value behind the error. `false` when nothing could be done.
fn repair(value: &mut Value, steps: &[Step], message: &str) -> bool {
    if message.starts_with("unknown field `") {
        let name = quoted(message).unwrap_or_default().to_string();
        let parent = match steps.last() {
            Some(Step::Key(k)) if *k == name => &steps[..steps.len() - 1],
            _ => steps,
        };
        return at_mut(value, parent).and_then(Value::as_object_mut).is_some_and(|o| o.remove(&name).is_some());
    }
    if message.starts_with("missing field `") {
        let name = quoted(message).unwrap_or_default().to_string();
        let mut target = steps.to_vec();
        target.push(Step::Key(name.clone()));
        return stand_in(value, steps, &target, |object, v| {
            object.as_object_mut().map(|o| o.insert(name.clone(), v)).is_some()
        });
    }
    let Some((last, parent)) = steps.split_last() else { return false };
    match (last, at_mut(value, parent)) {
        (Step::Key(key), Some(Value::Object(object))) => object.remove(key).is_some(),
        (Step::Index(i), Some(Value::Array(_))) => {
            let i = *i;
            stand_in(value, parent, steps, |array, v| array.get_mut(i).map(|slot| *slot = v).is_some())
        }
        _ => false,
    }
}

/// Puts the first stand-in into `container` (at `container_steps`) with `put` that moves the
/// error away from `target`; `false` if none does.
fn stand_in(
    value: &mut Value,
    container_steps: &[Step],
    target: &[Step],
    put: impl Fn(&mut Value, Value) -> bool,
) -> bool {
    let target_path = render(target);
    for candidate in stand_ins() {
        let mut trial = value.clone();
        let Some(container) = at_mut(&mut trial, container_steps) else { return false };
        if !put(container, candidate) {
            return false;
        }
        let still_there = match serde_path_to_error::deserialize::<_, RawConfig>(trial.clone()) {
            Ok(_) => false,
            Err(e) => {
                let (field, _) = locate(&e.path().to_string(), &e.inner().to_string());
                field == target_path
            }
        };
        if !still_there {
            *value = trial;
            return true;
        }
    }
    false
}

fn render(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Index(i) => out.push_str(&format!("[{i}]")),
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
        }
    }
    out
}
