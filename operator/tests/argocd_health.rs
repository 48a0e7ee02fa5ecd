//! The Argo CD health check (`charts/fhir-operator/argocd/health.lua`),
//! evaluated by real Lua interpreters from Debian's packages: lua5.1 (the
//! dialect of Argo CD's gopher-lua) and lua5.4, in a sandbox holding only
//! what Argo CD gives a script without its standard libraries (base
//! functions and `table`; strings without methods).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fhir_operator::api::{RateLimitTier, RateLimitTierSpec};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use support::{LUA51, LUA54, tool};

fn argocd_dir() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()))
        .join("../charts/fhir-operator/argocd")
}

/// A JSON value as a Lua constructor; null is nil, as Argo CD decodes it.
fn lua_literal(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("nil"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => {
            out.push('"');
            for ch in s.chars() {
                match ch {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\{:03}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        Value::Array(items) => {
            out.push('{');
            for item in items {
                lua_literal(item, out);
                out.push_str(", ");
            }
            out.push('}');
        }
        Value::Object(map) => {
            out.push('{');
            for (key, item) in map {
                out.push('[');
                lua_literal(&Value::String(key.clone()), out);
                out.push_str("] = ");
                lua_literal(item, out);
                out.push_str(", ");
            }
            out.push('}');
        }
    }
}

/// Runs the health check on `object` with `lua`: (status, message).
fn health(lua: &Path, object: &Value) -> (String, String) {
    let mut obj = String::new();
    lua_literal(object, &mut obj);
    let driver = format!(
        r#"
local f = assert(io.open(arg[1]))
local source = f:read("*a")
f:close()
local env = {{ ipairs = ipairs, pairs = pairs, next = next, select = select, type = type,
  tostring = tostring, tonumber = tonumber, error = error, assert = assert, pcall = pcall,
  rawget = rawget, rawset = rawset, rawequal = rawequal, setmetatable = setmetatable,
  getmetatable = getmetatable, unpack = unpack, table = table }}
env.obj = {obj}
local chunk
if setfenv then
  chunk = assert(loadstring(source, "health.lua"))
  setfenv(chunk, env)
else
  chunk = assert(load(source, "health.lua", "t", env))
end
-- Argo CD opens no string library: strings have no methods there.
debug.setmetatable("", nil)
local hs = chunk()
io.write(tostring(hs.status), "\t", tostring(hs.message))
"#
    );
    let mut child = Command::new(lua)
        .arg("-")
        .arg(argocd_dir().join("health.lua"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", lua.display()));
    child.stdin.take().unwrap().write_all(driver.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{} failed on {object}: {}", lua.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\t').unwrap_or((&text, ""));
    (status.to_owned(), message.to_owned())
}

fn interpreters() -> [PathBuf; 2] {
    [tool(&LUA51), tool(&LUA54)]
}

#[test]
fn every_sample_gets_its_health_in_both_lua_dialects() {
    let text = std::fs::read_to_string(argocd_dir().join("health_test.yaml")).expect("health_test.yaml");
    let samples: Value = serde_yaml::from_str(&text).expect("health_test.yaml is YAML");
    let cases = samples["tests"].as_array().expect("tests");
    let mut seen = std::collections::BTreeSet::new();
    for lua in interpreters() {
        for case in cases {
            let name = case["name"].as_str().unwrap_or("?");
            let got = health(&lua, &case["object"]);
            let want = (
                case["expect"]["status"].as_str().unwrap().to_owned(),
                case["expect"]["message"].as_str().unwrap().to_owned(),
            );
            assert_eq!(got, want, "{}: {name}", lua.display());
            seen.insert((case["object"]["kind"].as_str().unwrap_or_default().to_owned(), got.0));
        }
    }
    // Each kind is sampled healthy, progressing and degraded.
    for kind in ["FhirEndpoint", "KeyRotationSchedule", "RateLimitTier", "BackupPolicy"] {
        for status in ["Healthy", "Progressing", "Degraded"] {
            assert!(seen.contains(&(kind.to_owned(), status.to_owned())), "no {status} sample of {kind}");
        }
    }
    println!("{} samples, each with lua5.1 and lua5.4", cases.len());
}

/// The status the RateLimitTier controller really writes.
#[test]
fn the_tier_controllers_own_status_reads_healthy_or_degraded() {
    let now = Timestamp::from_second(1_800_000_000).unwrap();
    let tier = |size: &str| {
        let spec: RateLimitTierSpec =
            serde_json::from_value(json!({"requestsPerSecond": 10, "maxRequestBodySize": size})).unwrap();
        let mut tier = RateLimitTier::new("bronze", spec);
        tier.metadata.generation = Some(1);
        tier.status = Some(fhir_operator::ratelimittier::desired_status(&tier, Vec::new(), now));
        serde_json::to_value(&tier).unwrap()
    };
    for lua in interpreters() {
        assert_eq!(health(&lua, &tier("1Mi")), ("Healthy".into(), "Valid: the gateway enforces this tier".into()));
        let (status, message) = health(&lua, &tier("99999999999999Gi"));
        assert_eq!(status, "Degraded");
        assert!(message.starts_with("InvalidSpec: spec.maxRequestBodySize"), "{message}");
    }
}
