use super::*;
use std::net::IpAddr;

/// A small valid configuration, for tests here and in other modules.
pub(crate) const MINIMAL: &str = r#"
[gateway]
id = "gw-1"
site = "st-mary"
data_dir = "/var/lib/wardgate"

[edge]
listen = "0.0.0.0:8883"
ca = "pki/ca.pem"
cert = "pki/server.pem"
key = "pki/server.key"

[[device_class]]
name = "pump"
publish = ["ward/{device}/#"]

[[device]]
id = "pump-1"
class = "pump"
address = "10.0.0.5"
"#;

fn errors(text: &str) -> Vec<Diagnostic> {
    match Config::parse(text, Path::new("/etc/wardgate/wardgate.toml")) {
        Ok(_) => panic!("expected errors"),
        Err(ConfigError::Invalid { diagnostics, .. }) => diagnostics,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_class_filter_must_start_with_a_name_not_an_empty_level() {
    let text = MINIMAL.replace(
        "publish = [\"ward/{device}/#\"]",
        "publish = [\"/#\", \"ward/{device}/#\"]\nsubscribe = [\"/ward/{device}\"]",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 2, "{d:?}");
    for (diag, filter) in d.iter().zip(["\"/#\"", "\"/ward/{device}\""]) {
        assert!(diag.message.contains(filter), "{diag:?}");
        assert!(diag.message.contains("must be a name"), "{diag:?}");
    }
}

#[test]
fn no_class_may_reach_the_gateways_own_topics() {
    let text = MINIMAL.replace(
        "publish = [\"ward/{device}/#\"]",
        "publish = [\"#\", \"ward/{device}/#\"]\nsubscribe = [\"_gateway/cmd/#\", \"+/alarm\"]",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 3, "{d:?}");
    for (diag, filter) in d.iter().zip(["\"#\"", "\"_gateway/cmd/#\"", "\"+/alarm\""]) {
        assert!(diag.message.contains(filter), "{diag:?}");
        assert!(diag.message.contains("the gateway's own"), "{diag:?}");
    }
    assert!(d[0].line < d[1].line);
}

#[test]
fn relative_paths_are_taken_from_where_a_linked_file_really_is() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("data");
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(site.join("wardgate.toml"), MINIMAL).unwrap();
    std::os::unix::fs::symlink(site.join("wardgate.toml"), etc.join("wardgate.toml")).unwrap();
    let c = Config::load(&etc.join("wardgate.toml")).unwrap();
    assert_eq!(
        c.edge.ca,
        std::fs::canonicalize(&site).unwrap().join("pki/ca.pem")
    );
}

#[test]
fn mqtt5_limits_of_a_class_are_two_byte_numbers_with_safe_defaults() {
    let c = Config::parse(MINIMAL, Path::new("/etc/w.toml")).unwrap();
    assert_eq!(c.classes["pump"].receive_maximum, DEFAULT_RECEIVE_MAXIMUM);
    assert_eq!(
        c.classes["pump"].topic_alias_maximum,
        DEFAULT_TOPIC_ALIAS_MAXIMUM
    );
    let set = |lines: &str| {
        MINIMAL.replace(
            "publish = [\"ward/{device}/#\"]",
            &format!("publish = [\"ward/{{device}}/#\"]\n{lines}"),
        )
    };
    let c = Config::parse(
        &set("receive_maximum = 8\ntopic_alias_maximum = 0"),
        Path::new("/etc/w.toml"),
    )
    .unwrap();
    assert_eq!(c.classes["pump"].receive_maximum, 8);
    assert_eq!(c.classes["pump"].topic_alias_maximum, 0);
    let d = errors(&set("receive_maximum = 0\ntopic_alias_maximum = 65536"));
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d[0]
        .message
        .contains("receive_maximum must be between 1 and 65535"));
    assert!(d[1]
        .message
        .contains("topic_alias_maximum must be between 0 and 65535"));
}

#[test]
fn commit_interval_is_a_duration_of_at_most_a_tenth_of_a_second() {
    let c = Config::parse(MINIMAL, Path::new("/etc/w.toml")).unwrap();
    assert_eq!(c.spool.commit_interval, DEFAULT_SPOOL_COMMIT_INTERVAL);
    let text = format!("{MINIMAL}\n[spool]\ncommit_interval = \"0s\"\n");
    let c = Config::parse(&text, Path::new("/etc/w.toml")).unwrap();
    assert_eq!(c.spool.commit_interval, Duration::ZERO);
    let d = errors(&format!("{MINIMAL}\n[spool]\ncommit_interval = \"1s\"\n"));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].message
            .contains("commit_interval must be at most 100ms"),
        "{d:?}"
    );
}

#[test]
fn minimal_file_gets_defaults() {
    let c = Config::parse(MINIMAL, Path::new("/etc/wardgate/wardgate.toml")).unwrap();
    assert_eq!(c.edge.ca, Path::new("/etc/wardgate/pki/ca.pem"));
    assert_eq!(c.edge.crl, None);
    assert_eq!(c.edge.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
    assert_eq!(c.broker.listen, DEFAULT_BROKER_LISTEN.parse().unwrap());
    assert_eq!(c.broker.segment_size, DEFAULT_SEGMENT_SIZE);
    assert_eq!(c.admin.socket, Path::new(DEFAULT_ADMIN_SOCKET));
    assert_eq!(c.classes["pump"].max_payload, DEFAULT_MAX_PAYLOAD);
    assert!(c.classes["pump"].subscribe.is_empty());
    let id = DeviceId::parse("pump-1").unwrap();
    assert_eq!(
        c.devices[&id].address,
        "10.0.0.5".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/wardgate.toml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.devices.is_empty());
    assert!(!c.classes.is_empty());
}

#[test]
fn syntax_error_has_its_line() {
    let d = errors("[gateway]\nid = \"gw\"\nsite = \n");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].line, 3);
}

#[test]
fn unknown_field_has_its_line() {
    let text = MINIMAL.replace("site = \"st-mary\"", "site = \"st-mary\"\nsiet = \"x\"");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].line, 5);
    assert!(d[0].message.contains("siet"), "{}", d[0].message);
}

#[test]
fn missing_sections_and_fields_are_all_reported() {
    let d = errors("[gateway]\nid = \"gw\"\n\n[[device]]\nid = \"d\"\n");
    let messages: Vec<(usize, &str)> = d.iter().map(|d| (d.line, d.message.as_str())).collect();
    assert_eq!(
        messages,
        vec![
            (1, "missing field `site`"),
            (1, "missing field `data_dir`"),
            (1, "missing section [edge]"),
            (4, "missing field `class`"),
            (4, "missing field `address`"),
        ]
    );
}

#[test]
fn every_error_is_reported_at_once_with_its_line() {
    let text = r#"
[gateway]
id = "gw/1"
site = "st-mary"
data_dir = "/var/lib/wardgate"
shutdown_grace = "soon"

[edge]
listen = "8883"
ca = "ca.pem"
cert = "server.pem"
key = "server.key"
max_connections = 0

[broker]
listen = "0.0.0.0:1883"
segment_size = "1MB!"

[[device_class]]
name = "pump"
publish = ["ward/{device}/#", "ward/x{device}"]
subscribe = ["ward/#/cmd"]
max_payload = "64KB"

[[device_class]]
name = "pump"

[[device]]
id = "pump 1"
class = "pump"
address = "10.0.0.5"

[[device]]
id = "pump-2"
class = "pumpp"
address = "10.0.0.300"

[[device]]
id = "pump-3"
class = "pump"
address = "10.0.0.7"

[[device]]
id = "pump-3"
class = "pump"
address = "10.0.0.8"
"#;
    let d = errors(text);
    let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
    assert_eq!(
        lines,
        vec![3, 6, 9, 13, 16, 17, 21, 22, 23, 26, 29, 35, 36, 44],
        "{d:#?}"
    );
    assert!(d[0].message.contains("gateway id"));
    assert!(d[4].message.contains("not a loopback"));
    assert!(d[6].message.contains("whole level"));
    assert!(d[8].message.contains("unknown size unit"));
    assert!(d[9].message.contains("defined twice"));
    assert!(d[10].message.contains("only ASCII"));
    assert!(d[11].message.contains("unknown device class"));
    assert!(d[12].message.contains("not an IP address"));
    assert!(d[13].message.contains("registered twice"));
}

#[test]
fn spool_and_uplink_sections() {
    let ok = format!(
        "{MINIMAL}\n[spool]\nmax_bytes = \"1MiB\"\n[spool.max_age]\nroutine = \"1h\"\n\n\
         [uplink]\nhost = \"broker\"\nca = \"u/ca.pem\"\ncert = \"u/c.pem\"\nkey = \"u/c.key\"\n"
    );
    let c = Config::parse(&ok, Path::new("/etc/wardgate/wardgate.toml")).unwrap();
    assert_eq!(c.spool.max_bytes, 1 << 20);
    assert_eq!(c.spool.max_age[2], Duration::from_secs(3600));
    assert_eq!(c.spool.max_age[0], DEFAULT_MAX_AGE_ALARM);
    let u = c.uplink.unwrap();
    assert_eq!(
        (u.port, u.client_id.as_str()),
        (DEFAULT_UPLINK_PORT, "gw-1")
    );
    assert_eq!(u.ca, Path::new("/etc/wardgate/u/ca.pem"));

    let bad = format!(
        "{MINIMAL}\n[spool]\nmax_bytes = \"1MiB\"\ndevice_quota = \"2MiB\"\n\n\
         [uplink]\nport = 0\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\ninflight = 5000\n\
         topic_prefix = \"a/#\"\nbackoff_min = \"2s\"\nbackoff_max = \"1s\"\n"
    );
    let d = errors(&bad);
    let got: Vec<(usize, &str)> = d.iter().map(|d| (d.line, d.message.as_str())).collect();
    assert_eq!(
        got[0],
        (24, "device_quota must be between 1 byte and max_bytes")
    );
    assert_eq!(got[1], (26, "missing field `host`"));
    assert_eq!(got[2].0, 27);
    assert!(got[3].1.contains("inflight must be at most"), "{got:?}");
    assert!(got[4].1.contains("topic_prefix"), "{got:?}");
    assert_eq!(got[5], (34, "backoff_max must not be below backoff_min"));
}

#[test]
fn rendered_errors_name_file_and_line() {
    let text = MINIMAL.replace("\"10.0.0.5\"", "\"ten\"");
    let e = Config::parse(&text, Path::new("/etc/w.toml")).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("/etc/w.toml:20:11: device address \"ten\""),
        "{s}"
    );
}

#[test]
fn firewall_section_with_defaults_and_every_error_at_once() {
    let ok = format!(
        "{MINIMAL}\n[broker]\nlisten = \"127.0.0.1:1883\"\n[firewall]\n\
         device_interfaces = [\"ward0\"]\nmanagement_networks = [\"10.70.0.0/24\"]\n\
         [[firewall.forward]]\nname = \"pacs\"\nnetwork = \"10.1.2.3\"\nport = 104\n"
    );
    let c = Config::parse(&ok, Path::new("/etc/wardgate/wardgate.toml")).unwrap();
    let f = c.firewall.unwrap();
    assert_eq!(f.management_ports, DEFAULT_MANAGEMENT_PORTS);
    assert_eq!(f.new_connections_per_sec, DEFAULT_NEW_CONNECTIONS_PER_SEC);
    assert_eq!(f.forward[0].network.to_string(), "10.1.2.3/32");

    let bad = format!(
        "{MINIMAL}\n[firewall]\ndevice_interfaces = []\nmanagement_networks = [\"10.70.0.1/24\"]\n\
         management_ports = [0]\n[[firewall.forward]]\nname = \"pacs\"\nnetwork = \"x\"\n\
         protocol = \"icmp\"\n"
    );
    let msgs: Vec<String> = errors(&bad).into_iter().map(|d| d.message).collect();
    let has = |needle: &str| msgs.iter().any(|m| m.contains(needle));
    assert!(has("fixed port"), "{msgs:?}");
    assert!(has("at least one device interface"), "{msgs:?}");
    assert!(has("host bits"), "{msgs:?}");
    assert!(has("port must be between"), "{msgs:?}");
    assert!(has("not an IP address"), "{msgs:?}");
    assert!(has("protocol \"icmp\""), "{msgs:?}");
    assert!(has("missing field `port`"), "{msgs:?}");
}

#[test]
fn modbus_maps_are_checked_and_every_error_has_its_line() {
    let ok = format!(
        "{MINIMAL}\n[[modbus.bus]]\nname = \"plant\"\ntcp = \"10.70.3.10:502\"\n\
         [[modbus.bus]]\nname = \"rs485\"\nserial = \"/dev/ttyUSB0\"\nparity = \"even\"\n\
         [[modbus.device]]\nid = \"pump-1\"\nbus = \"plant\"\nunit = 1\n\
         [[modbus.device.register]]\nname = \"temp\"\nfunction = \"holding\"\naddress = 0\n\
         type = \"f32\"\nword_order = \"little\"\nscale = 0.1\nwrite_min = 2.0\nwrite_max = 8.0\n\
         [[modbus.device.register]]\nname = \"door\"\nfunction = \"coil\"\naddress = 0\n"
    );
    let c = Config::parse(&ok, Path::new("/etc/wardgate/wardgate.toml")).unwrap();
    let d = &c.modbus.devices[0];
    assert_eq!(d.registers[0].value_type, modbus::ValueType::F32);
    assert_eq!(d.registers[0].write, Some((2.0, 8.0)));
    assert_eq!(d.registers[1].value_type, modbus::ValueType::Bool);
    assert_eq!(d.interval, modbus::DEFAULT_INTERVAL);

    let bad = format!(
        "{MINIMAL}\n[[modbus.bus]]\nname = \"plant\"\ntcp = \"nowhere\"\n\
         [[modbus.device]]\nid = \"ghost\"\nbus = \"attic\"\nunit = 1\n\
         [[modbus.device.register]]\nname = \"x\"\nfunction = \"holding\"\naddress = 0\n\
         [[modbus.device]]\nid = \"pump-1\"\nbus = \"plant\"\nunit = 300\n\
         [[modbus.device.register]]\nname = \"a\"\nfunction = \"holding\"\naddress = 10\ntype = \"f64\"\n\
         [[modbus.device.register]]\nname = \"b\"\nfunction = \"holding\"\naddress = 12\n\
         [[modbus.device.register]]\nname = \"c\"\nfunction = \"input\"\naddress = 65535\ntype = \"u32\"\n\
         [[modbus.device.register]]\nname = \"d\"\nfunction = \"coil\"\naddress = 0\ntype = \"u16\"\n\
         [[modbus.device.register]]\nname = \"e\"\nfunction = \"input\"\naddress = 0\ntype = \"u128\"\n\
         [[modbus.device.register]]\nname = \"f\"\nfunction = \"input\"\naddress = 5\nwrite_min = 1.0\nwrite_max = 2.0\n\
         [[device_class]]\nname = \"quiet\"\npublish = [\"ward/{{device}}/status\"]\n\
         [[device]]\nid = \"pump-2\"\nclass = \"quiet\"\naddress = \"10.0.0.6\"\n\
         [[modbus.device]]\nid = \"pump-2\"\nbus = \"plant\"\nunit = 2\n\
         [[modbus.device.register]]\nname = \"x\"\nfunction = \"holding\"\naddress = 0\n"
    );
    let diags = errors(&bad);
    let has = |needle: &str| diags.iter().find(|d| d.message.contains(needle));
    for needle in [
        "write \"HOST:PORT\"",
        "not a registered [[device]]",
        "unknown bus \"attic\"",
        "unit must be between 0 and 255",
        "register b overlaps register a",
        "register c runs past address 65535",
        "may not publish ward/pump-2/modbus/x",
        "coils and discrete inputs are bool",
        "type \"u128\"",
        "only holding registers and coils can be written",
    ] {
        assert!(has(needle).is_some(), "{needle}: {diags:?}");
    }
    // Each error points at its own line.
    let line = |needle: &str| has(needle).map(|d| d.line).unwrap();
    assert!(line("unknown bus") < line("register b overlaps"));
}
