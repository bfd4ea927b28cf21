//! Config parsing, good and bad, through the public entry point.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, ConfigSource::File(PathBuf::from("/etc/fieldmq/t.toml")))
}

/// Every error, rendered, one string each.
fn errors(text: &str) -> Vec<String> {
    let errors = parse(text).expect_err("the config must be refused");
    let name = errors.source.to_string();
    errors.diagnostics.iter().map(|d| d.render(&name, &errors.text).to_string()).collect()
}

fn first_lines(errors: Vec<String>) -> Vec<String> {
    errors.iter().map(|e| e.lines().next().unwrap_or_default().to_owned()).collect()
}

#[test]
fn the_embedded_default_runs_the_system_device_on_localhost() {
    let config = Config::parse(EMBEDDED_DEFAULT, ConfigSource::Embedded).expect("the default is valid");
    assert_eq!(config.broker.listeners, [("127.0.0.1:1883".parse().unwrap(), ListenerKind::Tcp)]);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(config.devices.len(), 1);
    assert_eq!(config.devices[0].kind, DeviceKind::System);
    assert_eq!(config.devices[0].poll, Duration::from_secs(5));
    assert!(!config.gateway_id.is_empty());
}

#[test]
fn the_example_config_is_valid_and_means_what_its_comments_say() {
    let text = include_str!("../../../config/example.toml");
    // Where it is, so its acl_file (beside it) is found.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/example.toml");
    let config = Config::parse(text, ConfigSource::File(path)).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(config.gateway_id, "pi-01");
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/fieldmq"));
    assert_eq!(config.broker.max_packet_size, 1 << 20);
    let changes = &config.devices[1];
    assert_eq!(changes.format, Format::Value);
    assert_eq!(
        changes.publish,
        PublishPolicy::OnChange {
            heartbeat: Duration::from_secs(600),
            deadbands: vec![("load_1m".into(), 0.25), ("mem_available".into(), 16.0)]
        }
    );
}

#[test]
fn three_distinct_mistakes_are_reported_together_with_line_and_column() {
    let text = "\
[gateway]
id = \"pi-01\"

[[device]]
name = \"host\"
kind = \"system\"
poll = 5
topic = \"fieldmq/{gateway}/{node}\"
heartbeat_interval = \"1m\"

[[device]]
name = \"host-2\"
kind = \"system\"
poll = \"5 seconds\"
";
    let errors = errors(text);
    assert_eq!(
        first_lines(errors.clone()),
        [
            "/etc/fieldmq/t.toml:7:8: invalid type: integer `5`, expected a duration like \"250ms\", \"5s\" or \"2m\"",
            "/etc/fieldmq/t.toml:9:1: unknown field `heartbeat_interval`, expected one of `name`, `kind`, `poll`, `topic`, `format`, `publish`, `heartbeat`, `disks`, `address`, `unit_id`, `timeout`, `retries`, `max_gap`, `profile`, `port`, `baud`, `parity`, `data_bits`, `stop_bits`, `attribute`",
            "/etc/fieldmq/t.toml:14:8: invalid value: string \"5 seconds\", expected a duration like \"250ms\", \"5s\" or \"2m\"",
        ]
    );
    // Each error shows the offending text, underlined.
    assert!(errors[2].ends_with("14 | poll = \"5 seconds\"\n   |        ^^^^^^^^^^^"), "{}", errors[2]);
}

#[test]
fn meaning_errors_are_found_too_and_all_at_once() {
    let text = "\
[gateway]
id = \"pi/01\"
log = \"loud\"

[broker]
listen = [\"localhost:1883\"]

[[device]]
name = \"a\"
kind = \"system\"
topic = \"x/{nod}\"

[[device]]
name = \"a\"
kind = \"ble\"

[[device]]
name = \"b\"
kind = \"system\"
poll = \"10s\"
publish = \"on-change\"
heartbeat = \"5s\"
  [[device.attribute]]
  name = \"voltage\"
  deadband = -1.0

[[device]]
name = \"c\"
kind = \"system\"
heartbeat = \"1m\"
topic = \"t/{attribute}\"
";
    assert_eq!(
        first_lines(errors(text)),
        [
            "/etc/fieldmq/t.toml:2:6: the gateway id must not contain /, + or # (it is one level of a topic): `pi/01`",
            "/etc/fieldmq/t.toml:3:7: invalid log filter `loud`, expected a level (error, warn, info, debug, trace) or `target=level,...`",
            "/etc/fieldmq/t.toml:6:11: invalid listen address `localhost:1883`, expected IP:PORT like \"0.0.0.0:1883\" or \"[::]:1883\"",
            "/etc/fieldmq/t.toml:11:9: unknown placeholder `{nod}`, expected {gateway}, {node}, {attribute} or {kind}",
            "/etc/fieldmq/t.toml:14:8: a device named `a` is already defined: device names must be unique",
            "/etc/fieldmq/t.toml:15:8: device kind `ble` is not available in this version of fieldmq yet; available: system, modbus-tcp, modbus-rtu",
            "/etc/fieldmq/t.toml:22:13: heartbeat (5s) must be at least the poll period (10s)",
            "/etc/fieldmq/t.toml:24:10: a system device has no attribute `voltage`; it has: cpu_temp, load_1m, load_5m, load_15m, mem_used, mem_available, disk_free, uptime, process_rss",
            "/etc/fieldmq/t.toml:25:14: deadband must be a finite number >= 0",
            "/etc/fieldmq/t.toml:30:13: heartbeat applies only with publish = \"on-change\"",
            "/etc/fieldmq/t.toml:31:9: {attribute} needs format = \"value\": a json message carries every attribute of a reading",
        ]
    );
}

#[test]
fn defaults_fill_what_the_file_leaves_out() {
    let config = parse("[[device]]\nname = \"h\"\nkind = \"system\"\npublish = \"on-change\"\n").unwrap();
    let device = &config.devices[0];
    assert_eq!(device.poll, Duration::from_secs(5));
    assert_eq!(device.topic.to_string(), "fieldmq/{gateway}/{node}");
    assert_eq!(
        device.publish,
        PublishPolicy::OnChange { heartbeat: Duration::from_secs(300), deadbands: vec![] }
    );
    assert_eq!(config.broker.max_connections, 1000);
    assert!(config.broker.access.allow_anonymous);
}

/// A file in a fresh temporary directory, for keys that name files.
fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fieldmq-config-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn tls_listeners_need_a_certificate_and_key() {
    let text = "[broker]\ntls_listen = [\"127.0.0.1:8883\"]\nws_listen = [\"127.0.0.1:9001\"]\n";
    assert_eq!(
        first_lines(errors(text)),
        ["/etc/fieldmq/t.toml:2:14: tls_listen needs tls_cert and tls_key"]
    );
    let text = "[broker]\ntls_listen = [\"127.0.0.1:8883\"]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n";
    let found = first_lines(errors(text));
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with("/etc/fieldmq/t.toml:3:12: /nonexistent/c.pem: "), "{found:?}");
    assert!(found[1].starts_with("/etc/fieldmq/t.toml:4:11: /nonexistent/k.pem: "), "{found:?}");
}

#[test]
fn a_bad_acl_or_password_line_is_refused_with_its_place_in_both_files() {
    let acl = temp_file("acl", "topic read fieldmq/#\n\nuser alice\ntopic reed fieldmq/#\ntopc write x\n");
    let passwd = temp_file("passwd", "alice:$7$10$AAAA\n");
    let text =
        format!("[broker]\nacl_file = \"{}\"\npassword_file = \"{}\"\n", acl.display(), passwd.display());
    let found = first_lines(errors(&text));
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].starts_with(&format!("/etc/fieldmq/t.toml:2:12: {}:4:", acl.display())), "{found:?}");
    assert!(found[1].starts_with(&format!("/etc/fieldmq/t.toml:2:12: {}:5:1:", acl.display())), "{found:?}");
    assert!(
        found[2].starts_with(&format!("/etc/fieldmq/t.toml:3:17: {}:1:7:", passwd.display())),
        "{found:?}"
    );
}

#[test]
fn anonymous_writes_on_a_lan_listener_are_warned_about_unless_the_acl_forbids_them() {
    let open = parse("[broker]\nlisten = [\"0.0.0.0:1883\", \"127.0.0.1:1884\"]\n").unwrap();
    assert_eq!(open.warnings.len(), 1, "{:?}", open.warnings);
    assert!(
        open.warnings[0].starts_with("/etc/fieldmq/t.toml:2:10: 0.0.0.0:1883 lets anonymous clients write")
    );
    let read_only = temp_file("acl-ro", "topic read fieldmq/#\nuser ops\ntopic readwrite fieldmq/#\n");
    let text = format!("[broker]\nlisten = [\"0.0.0.0:1883\"]\nacl_file = \"{}\"\n", read_only.display());
    assert_eq!(parse(&text).unwrap().warnings, Vec::<String>::new());
    let writable = temp_file("acl-rw", "topic readwrite fieldmq/#\n");
    let text = format!("[broker]\nlisten = [\"0.0.0.0:1883\"]\nacl_file = \"{}\"\n", writable.display());
    assert_eq!(parse(&text).unwrap().warnings.len(), 1);
    let closed = parse("[broker]\nlisten = [\"0.0.0.0:1883\"]\nallow_anonymous = false\n").unwrap();
    assert_eq!(closed.warnings.len(), 1, "{:?}", closed.warnings);
    assert!(closed.warnings[0].contains("no client can connect"), "{:?}", closed.warnings);
}

#[test]
fn a_relative_data_dir_is_relative_to_the_config_file() {
    let config = parse("[gateway]\ndata_dir = \"state\"\n").unwrap();
    assert_eq!(config.data_dir, PathBuf::from("/etc/fieldmq/state"));
}

#[test]
fn an_unreadable_file_is_refused_with_its_path() {
    let err = Config::load(Some(std::path::Path::new("/nonexistent/fieldmq.toml"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "error: /nonexistent/fieldmq.toml: cannot read the config: No such file or directory (os error 2)\n\
         /nonexistent/fieldmq.toml: 1 error found; the config was not applied"
    );
}

#[test]
fn one_typo_gives_one_error_not_echoes_from_the_keys_around_it() {
    let text = "\
[[device]]
name = \"a\"
kind = \"system\"
publish = \"onchange\"
heartbeat = \"10m\"
format = \"values\"
topic = \"t/{attribute}\"
  [[device.attribute]]
  name = \"load_1m\"
  deadband = 0.5
";
    assert_eq!(
        first_lines(errors(text)),
        [
            "/etc/fieldmq/t.toml:4:11: invalid value: string \"onchange\", expected one of \"always\", \"on-change\"",
            "/etc/fieldmq/t.toml:6:10: invalid value: string \"values\", expected one of \"json\", \"value\"",
        ]
    );
}

#[test]
fn a_device_may_not_take_the_name_of_the_gateway_status_topic() {
    assert_eq!(
        first_lines(errors("[[device]]\nname = \"status\"\nkind = \"system\"\n")),
        ["/etc/fieldmq/t.toml:2:8: a device name must not be `status`: fieldmq/{gateway}/status is the gateway's own status"]
    );
}

#[test]
fn a_modbus_device_takes_its_profile_and_its_own_attributes() {
    let text = "\
[[profile]]
name = \"meter\"
  [[profile.attribute]]
  name = \"voltage\"
  table = \"input\"
  register = 0
  type = \"f32\"
  unit = \"V\"

[[device]]
name = \"m1\"
kind = \"modbus-tcp\"
address = \"127.0.0.1:502\"
unit_id = 3
profile = \"meter\"
publish = \"on-change\"
  [[device.attribute]]
  name = \"voltage\"
  deadband = 0.5
  [[device.attribute]]
  name = \"relay\"
  table = \"coil\"
  register = 4
";
    let config = parse(text).unwrap_or_else(|e| panic!("{e}"));
    let DeviceSettings::ModbusTcp { address, modbus } = &config.devices[0].settings else {
        panic!("not modbus")
    };
    assert_eq!(address.to_string(), "127.0.0.1:502");
    assert_eq!(modbus.unit, 3);
    let names: Vec<&str> = modbus.attributes.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["voltage", "relay"]);
    assert_eq!(
        config.devices[0].publish,
        PublishPolicy::OnChange {
            heartbeat: Duration::from_secs(300),
            deadbands: vec![("voltage".into(), 0.5)]
        }
    );
}

#[test]
fn modbus_mistakes_are_reported_with_their_place() {
    let text = "\
[[device]]
name = \"a\"
kind = \"modbus-tcp\"
  [[device.attribute]]
  name = \"x\"
  table = \"holding\"
  register = 0

[[device]]
name = \"b\"
kind = \"modbus-tcp\"
address = \"127.0.0.1:502\"
profile = \"nope\"

[[device]]
name = \"c\"
kind = \"modbus-tcp\"
address = \"127.0.0.1:502\"
  [[device.attribute]]
  name = \"flag\"
  table = \"coil\"
  register = 1
  type = \"u16\"
  [[device.attribute]]
  name = \"label\"
  table = \"holding\"
  register = 2
  type = \"string\"

[[device]]
name = \"d\"
kind = \"system\"
address = \"127.0.0.1:502\"
";
    assert_eq!(
        first_lines(errors(text)),
        [
            "/etc/fieldmq/t.toml:3:8: a modbus-tcp device needs address = \"host:port\"",
            "/etc/fieldmq/t.toml:13:11: no [[profile]] named `nope`; defined: eastron-sdm630",
            "/etc/fieldmq/t.toml:23:10: coils and discrete inputs are read as type = \"bool\"",
            "/etc/fieldmq/t.toml:25:10: attribute `label`: a string needs count = 1..125 registers",
            "/etc/fieldmq/t.toml:33:11: `address` is for Modbus devices, not for kind `system`",
        ]
    );
}

#[test]
fn the_built_in_sdm630_profile_is_valid_and_coalesces() {
    let text = "[[device]]\nname = \"meter\"\nkind = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\nprofile = \"eastron-sdm630\"\n";
    let config = parse(text).unwrap_or_else(|e| panic!("{e}"));
    let DeviceSettings::ModbusTcp { modbus, .. } = &config.devices[0].settings else { panic!("not modbus") };
    assert_eq!(modbus.attributes.len(), 25);
    // Coalescing with the default max_gap of 10: 25 attributes in 4
    // requests (0..18, 30..76, 200..206, 342..344) instead of 25.
    let requests = adapters::modbus::plan(&modbus.attributes, modbus.max_gap);
    let spans: Vec<(u16, u16)> = requests.iter().map(|r| (r.start, r.start + r.count)).collect();
    assert_eq!(spans, [(0, 18), (30, 76), (200, 206), (342, 344)]);
}

#[test]
fn only_coils_and_numeric_holding_registers_are_writable() {
    let text = "\
[[device]]
name = \"m\"
kind = \"modbus-tcp\"
address = \"127.0.0.1:502\"
  [[device.attribute]]
  name = \"a\"
  table = \"input\"
  register = 0
  writable = true
  [[device.attribute]]
  name = \"b\"
  table = \"holding\"
  register = 1
  max = 10.0
";
    assert_eq!(
        first_lines(errors(text)),
        [
            "/etc/fieldmq/t.toml:9:14: writable = true needs a coil, a numeric holding register or a bit of one (not input, discrete or a string)",
            "/etc/fieldmq/t.toml:14:9: min and max bound writes: they need writable = true",
        ]
    );
}

#[test]
fn review_findings_in_modbus_config_are_refused() {
    let text = "\
[[device]]
name = \"m\"
kind = \"modbus-rtu\"
port = \"/dev/ttyUSB0\"
unit_id = 0
  [[device.attribute]]
  name = \"a\"
  table = \"holding\"
  register = 0
  offset = nan
";
    assert_eq!(
        first_lines(errors(text)),
        [
            "/etc/fieldmq/t.toml:5:11: unit_id 0 is the broadcast address on RTU: every slave would act, none answer",
            "/etc/fieldmq/t.toml:10:12: must be a finite number",
        ]
    );
}
