//! Table tests for `keyward check`: config text in, the whole list of problems out, structural
//! problems (typos, wrong types, missing fields) together with everything validation finds.

use super::load_str;

const BASE: &str = r#"
[[sources]]
name = "environment"
provider = "env"
mapping = { OPENAI_API_KEY = "{{OPENAI_API_KEY}}" }

[[routes]]
name = "openai"
prefix = "/openai"
upstream = "https://api.openai.com"
agent_key = { header = "authorization", scheme = "Bearer" }
inject = { header = "authorization", value = "Bearer {{secret}}" }

[roles.worker]
grants = [{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"] }]

[[agents]]
id = "a"
role = "worker"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

/// Every problem `text` has, as `line: field: message` strings.
fn problems(text: &str) -> Vec<String> {
    match load_str(text, "k.toml", false) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0.iter().map(|p| p.to_string().trim_start_matches("k.toml:").to_string()).collect(),
    }
}

/// `BASE` with each `(from, to)` replacement applied (each `from` must occur).
fn edit(pairs: &[(&str, &str)]) -> String {
    let mut text = BASE.to_string();
    for (from, to) in pairs {
        assert!(text.contains(from), "{from}");
        text = text.replacen(from, to, 1);
    }
    text
}

#[test]
fn the_base_config_is_valid() {
    assert_eq!(problems(BASE), Vec::<String>::new());
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "a typo, an unknown route and a bad cron",
            edit(&[
                ("prefix = \"/openai\"", "prefx = \"/openai\""),
                ("route = \"openai\"", "route = \"opnai\""),
                (
                    "provider = \"env\"",
                    "provider = \"file\"\npath = \"/dev/null\"\nrotation = { schedule = \"0 25 * * *\" }",
                ),
            ]),
            vec![
                "6: sources[0].rotation.schedule: '0 25 * * *': the hour field '25' is out of range (allowed: 0-23, with * , - /)",
                "9: routes[0].prefix: missing field `prefix`: a route needs a `prefix` (reverse proxy), `hosts` (forward proxy), or both",
                "11: routes[0].prefx: unknown field `prefx`, expected one of `name`, `prefix`, `upstream`, `hosts`, \
                 `ports`, `connect_to`, `upstream_ca_file`, `allow_plaintext`, `scrub_responses`, `agent_key`, `pass_headers`, `inject`, `validate` (did you mean `prefix`?)",
                // Only the broken route's own problems; a reference to another name is still news.
                "17: roles.worker.grants[0].route: no route named 'opnai' (did you mean 'openai'?)",
            ],
        ),
        (
            "wrong types in two sections",
            format!("{BASE}\n[server]\nlisten = 5\nheader_read_timeout_ms = \"x\"\n"),
            vec![
                "23: server.listen: expected a string or a list of strings",
                "24: server.header_read_timeout_ms: invalid type: string \"x\", expected u64",
            ],
        ),
        (
            "a missing upstream does not also make every grant on the route wrong",
            edit(&[("upstream = \"https://api.openai.com\"\n", "")]),
            vec!["7: routes[0].upstream: missing field `upstream`"],
        ),
        (
            "typos in a nested table and in an agent",
            edit(&[
                ("{ header = \"authorization\", scheme", "{ heder = \"authorization\", scheme"),
                ("role = \"worker\"", "rol = \"worker\""),
            ]),
            vec![
                "11: routes[0].agent_key.heder: unknown field `heder`, expected `header` or `scheme` (did you mean `header`?)",
                "11: routes[0].agent_key.header: missing field `header`",
                "17: agents[0].role: missing field `role`",
                "19: agents[0].rol: unknown field `rol`, expected one of `id`, `role`, `key_sha256`, `peer_uid`, \
                 `disabled` (did you mean `role`?)",
            ],
        ),
        (
            "an unknown method, with a suggestion",
            edit(&[("methods = [\"POST\"]", "methods = [\"GTE\"]")]),
            vec![
                "15: roles.worker.grants[0].methods: 'GTE' is not an HTTP method keyward knows; did you mean \"GET\"?",
            ],
        ),
        (
            "an unknown role and route, with suggestions",
            edit(&[("role = \"worker\"", "role = \"wroker\""), ("route = \"openai\"", "route = \"OpenAI\"")]),
            vec![
                "15: roles.worker.grants[0].route: no route named 'OpenAI' (did you mean 'openai'?)",
                "19: agents[0].role: no role named 'wroker' (did you mean 'worker'?)",
            ],
        ),
        (
            "an unknown top-level table",
            format!("[sever]\nlisten = \"127.0.0.1:1\"\n{BASE}"),
            vec![
                "1: sever: unknown field `sever`, expected one of `server`, `forward`, `forward_proxy`, `audit`, `admin`, `limits`, \
                 `sources`, `sources_from`, `notifications`, `secrets`, `routes`, `roles`, `agents`, `usage`, `budgets` (did you mean `server`?)",
            ],
        ),
    ];
    for (name, text, expected) in cases {
        let expected: Vec<String> =
            expected.iter().map(|e| e.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        let got: Vec<String> =
            problems(&text).iter().map(|e| e.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(got, expected, "{name}:\n{}", got.join("\n"));
    }
}

#[test]
fn cron_errors_name_the_field() {
    let cases = [
        ("0 25 * * *", "the hour field '25' is out of range (allowed: 0-23"),
        ("61 * * * *", "the minute field '61' is out of range (allowed: 0-59"),
        ("0 0 32 * *", "the day-of-month field '32' is out of range (allowed: 1-31"),
        ("0 0 * 13 *", "the month field '13' is out of range (allowed: 1-12 or JAN-DEC"),
        ("0 0 * * 9", "the day-of-week field '9' is out of range (allowed: 0-7 or SUN-SAT"),
        ("0 0 * * FUNDAY", "the day-of-week field 'FUNDAY' is not valid"),
        ("99 0 0 * * *", "the second field '99' is out of range (allowed: 0-59"),
        ("0 0 * *", "has 4 fields; use 5"),
    ];
    for (schedule, expected) in cases {
        let error = super::Schedule::parse(schedule).unwrap_err();
        assert!(error.contains(expected), "{schedule}: {error}");
    }
    assert!(super::Schedule::parse("*/15 8-18 * * MON-FRI").is_ok());
}
