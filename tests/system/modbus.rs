//! The Modbus poller against simulated equipment: a tokio-modbus server in the test process
//! (TCP), the same over RTU on a socat pseudo-terminal pair, and pymodbus as an independent
//! implementation. Values arrive as telemetry through the device's class policy; failing
//! devices are reported and do not stop the others; writes land only where the map allows.

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;

use crate::support::clients::Client;
use crate::support::modbus_sim::Sim;
use crate::support::upstream::{Link, Upstream};
use crate::support::{Class, Site};

/// A ward with a cold-store class for Modbus equipment and a building monitor that watches
/// every Modbus topic (`bms-1`).
fn modbus_site() -> Site {
    let mut site = Site::ward();
    site.classes.push(Class::publishing_own("cold-store", ""));
    site.classes.push(Class {
        name: "building-monitor",
        publish: vec![],
        subscribe: vec!["ward/+/modbus/#"],
        max_payload: "1KiB",
        extra: "",
    });
    for id in ["fridge-1", "fridge-2", "plant-3"] {
        site.register(id, "cold-store", "127.0.0.1");
    }
    site.register("bms-1", "building-monitor", "127.0.0.1");
    site
}

/// (name, function, address, type, word order, scale, words in the simulator)
type Reg = (
    &'static str,
    &'static str,
    u16,
    &'static str,
    &'static str,
    f64,
    Vec<u16>,
);

/// Every type and word order, with words written by hand (not by the gateway's encoder).
fn registers() -> Vec<(Reg, serde_json::Value)> {
    vec![
        (
            (
                "temp",
                "holding",
                0,
                "f32",
                "big",
                1.0,
                vec![0x41AC, 0x0000],
            ),
            serde_json::json!(21.5),
        ),
        (
            (
                "temp_ws",
                "holding",
                2,
                "f32",
                "little",
                1.0,
                vec![0x0000, 0x41AC],
            ),
            serde_json::json!(21.5),
        ),
        (
            (
                "count",
                "holding",
                4,
                "u32",
                "big",
                1.0,
                vec![0x0001, 0x0002],
            ),
            serde_json::json!(65538.0),
        ),
        (
            (
                "count_ws",
                "holding",
                6,
                "u32",
                "little",
                1.0,
                vec![0x0002, 0x0001],
            ),
            serde_json::json!(65538.0),
        ),
        (
            (
                "delta",
                "holding",
                8,
                "i32",
                "big",
                1.0,
                vec![0xFFFF, 0xFFFE],
            ),
            serde_json::json!(-2.0),
        ),
        (
            (
                "delta_ws",
                "holding",
                10,
                "i32",
                "little",
                1.0,
                vec![0xFFFE, 0xFFFF],
            ),
            serde_json::json!(-2.0),
        ),
        (
            ("small", "holding", 12, "i16", "big", 1.0, vec![0xFFFB]),
            serde_json::json!(-5.0),
        ),
        (
            ("raw", "holding", 13, "u16", "big", 1.0, vec![0xFFFB]),
            serde_json::json!(65531.0),
        ),
        (
            (
                "energy",
                "holding",
                14,
                "f64",
                "big",
                1.0,
                vec![0x3FF8, 0, 0, 0],
            ),
            serde_json::json!(1.5),
        ),
        (
            (
                "energy_ws",
                "holding",
                18,
                "f64",
                "little",
                1.0,
                vec![0, 0, 0, 0x3FF8],
            ),
            serde_json::json!(1.5),
        ),
        (
            ("pressure", "input", 0, "u16", "big", 0.5, vec![2027]),
            serde_json::json!(1013.5),
        ),
    ]
}

fn register_toml(r: &Reg, extra: &str) -> String {
    let (name, function, address, ty, order, scale, _) = r;
    format!(
        "\n[[modbus.device.register]]\nname = {name:?}\nfunction = {function:?}\naddress = {address}\n\
         type = {ty:?}\nword_order = {order:?}\nscale = {scale:?}\nunit = \"x\"\n{extra}"
    )
}

/// The first `n` messages per topic that the monitor receives, until `done` holds.
async fn collect(
    bms: &mut Client,
    mut done: impl FnMut(&HashMap<String, Vec<serde_json::Value>>) -> bool,
) -> HashMap<String, Vec<serde_json::Value>> {
    let mut got: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    while !done(&got) {
        let p = bms.next_publish().await;
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        got.entry(p.topic.clone()).or_default().push(v);
    }
    got
}

#[tokio::test]
async fn every_type_and_word_order_decodes_and_failing_devices_do_not_stop_the_others() {
    let (a, b) = (Sim::start().await, Sim::start().await);
    for ((_, function, address, _, _, _, words), _) in registers() {
        if function == "input" {
            // Input registers share the simulator's table; keep them apart from holding ones.
            a.set_words(1, 1000 + address, &words);
        } else {
            a.set_words(1, address, &words);
        }
    }
    a.tables.lock().unwrap().coils.insert((1, 3), true);
    a.tables.lock().unwrap().failing_units.insert(2);
    b.silent.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut site = modbus_site();
    let mut toml = format!(
        "\n[[modbus.bus]]\nname = \"plant-a\"\ntcp = \"{}\"\ntimeout = \"300ms\"\n\
         [[modbus.bus]]\nname = \"plant-b\"\ntcp = \"{}\"\ntimeout = \"300ms\"\n\
         [[modbus.device]]\nid = \"fridge-1\"\nbus = \"plant-a\"\nunit = 1\ninterval = \"200ms\"\n",
        a.addr, b.addr
    );
    for (r, _) in registers() {
        let mut r = r;
        if r.1 == "input" {
            r.2 += 1000;
        }
        toml.push_str(&register_toml(&r, ""));
    }
    toml.push_str(
        "\n[[modbus.device.register]]\nname = \"door\"\nfunction = \"coil\"\naddress = 3\n\
         [[modbus.device]]\nid = \"fridge-2\"\nbus = \"plant-a\"\nunit = 2\ninterval = \"200ms\"\n\
         [[modbus.device.register]]\nname = \"temp\"\nfunction = \"holding\"\naddress = 0\n\
         [[modbus.device]]\nid = \"plant-3\"\nbus = \"plant-b\"\nunit = 1\ninterval = \"200ms\"\n\
         [[modbus.device.register]]\nname = \"o2\"\nfunction = \"input\"\naddress = 0\n",
    );
    site.extra = toml;
    let mut gw = site.start().await;
    let mut bms = Client::connect(&site, "bms-1", gw.port()).await;
    bms.subscribe("ward/+/modbus/#").await;

    let topic = |d: &str, r: &str| format!("ward/{d}/modbus/{r}");
    let names: Vec<&str> = registers().iter().map(|(r, _)| r.0).collect();
    let got = collect(&mut bms, |g| {
        names.iter().all(|n| g.contains_key(&topic("fridge-1", n)))
            && g.contains_key(&topic("fridge-1", "door"))
            && g.contains_key(&topic("fridge-2", "temp"))
            && g.contains_key(&topic("plant-3", "o2"))
    })
    .await;
    for ((name, ..), want) in registers() {
        let v = &got[&topic("fridge-1", name)][0];
        assert_eq!(v["quality"], "good", "{name}: {v}");
        assert_eq!(v["unit"], "x");
        let (g, w) = (v["value"].as_f64().unwrap(), want.as_f64().unwrap());
        assert!((g - w).abs() < 1e-9, "{name}: got {g}, want {w}");
        assert!(v["ts"].as_u64().unwrap() > 0);
    }
    assert_eq!(got[&topic("fridge-1", "door")][0]["value"], true);
    // The failing devices are reported, once, with quality bad and the reason.
    let f2 = &got[&topic("fridge-2", "temp")][0];
    assert_eq!(f2["quality"], "bad");
    assert!(
        f2["error"].as_str().unwrap().contains("IllegalDataAddress"),
        "{f2}"
    );
    let p3 = &got[&topic("plant-3", "o2")][0];
    assert!(p3["error"].as_str().unwrap().contains("timeout"), "{p3}");
    gw.wait_log("modbus.device_silent", &["device=fridge-2", "exception"])
        .await;
    gw.wait_log("modbus.device_silent", &["device=plant-3", "timeout"])
        .await;

    // fridge-1 is still polled: a new temperature arrives.
    a.set_words(1, 0, &[0x41B0, 0x0000]);
    let temp = topic("fridge-1", "temp");
    let got = collect(&mut bms, |g| {
        g.get(&temp)
            .is_some_and(|v| v.iter().any(|x| x["value"] == 22.0))
    })
    .await;
    assert!(got[&temp].iter().all(|x| x["quality"] == "good"));

    // plant-3 answers again: audited as returned, and its value flows.
    b.silent.store(false, std::sync::atomic::Ordering::Relaxed);
    gw.wait_log("modbus.device_returned", &["device=plant-3"])
        .await;
    let o2 = topic("plant-3", "o2");
    collect(&mut bms, |g| {
        g.get(&o2)
            .is_some_and(|v| v.iter().any(|x| x["quality"] == "good"))
    })
    .await;

    let counters = |d: &str| site.device_json(d)["counters"].clone();
    assert!(counters("fridge-2")["modbus_exceptions"].as_u64().unwrap() >= 1);
    assert!(counters("plant-3")["modbus_timeouts"].as_u64().unwrap() >= 1);
    assert!(counters("fridge-1")["modbus_polls"].as_u64().unwrap() >= 2);
    assert!(gw.stop().await.success());
    assert_eq!(site.audit_count("modbus.device_silent", "fridge-2"), 1);
    assert_eq!(site.audit_count("modbus.device_silent", "plant-3"), 1);
    assert_eq!(site.audit_count("modbus.device_returned", "plant-3"), 1);
}

#[tokio::test]
async fn writes_land_only_on_listed_registers_within_bounds_and_every_one_is_audited() {
    let sim = Sim::start().await;
    let mut site = modbus_site();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    let link = Link::start(upstream.port, true).await;
    site.extra = upstream.uplink_section("gw-test", link.port, "")
        + &format!(
            "\n[[modbus.bus]]\nname = \"plant\"\ntcp = \"{}\"\n\
             [[modbus.device]]\nid = \"fridge-1\"\nbus = \"plant\"\nunit = 1\ninterval = \"200ms\"\n\
             [[modbus.device.register]]\nname = \"temp\"\nfunction = \"input\"\naddress = 0\n\
             [[modbus.device.register]]\nname = \"setpoint\"\nfunction = \"holding\"\naddress = 20\n\
             type = \"f32\"\nwrite_min = 2.0\nwrite_max = 8.0\n\
             [[modbus.device.register]]\nname = \"level\"\nfunction = \"holding\"\naddress = 30\n\
             type = \"u16\"\nscale = 0.5\nwrite_min = 0.0\nwrite_max = 100.0\n\
             [[modbus.device.register]]\nname = \"defrost\"\nfunction = \"coil\"\naddress = 1\n\
             write_min = 0.0\nwrite_max = 1.0\n",
            sim.addr
        );
    let consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.commands_subscribed", &[]).await;
    let command = |register: &str, value: &str| {
        let topic = format!("hospital/st-mary/gw-test/fridge-1/cmd/modbus/{register}");
        let c = consumer.client.clone();
        let value = value.to_owned();
        async move {
            c.publish(topic, QoS::AtLeastOnce, false, value)
                .await
                .unwrap()
        }
    };

    command("setpoint", "5.5").await;
    gw.wait_log("modbus.write", &["register=\"setpoint\""])
        .await;
    assert_eq!(
        sim.words(1, 20, 2),
        [0x40B0, 0x0000],
        "5.5 as f32, high word first"
    );
    command("level", "42").await;
    gw.wait_log("modbus.write", &["register=\"level\""]).await;
    assert_eq!(sim.words(1, 30, 1), [84], "42 at scale 0.5 is 84");
    command("defrost", "true").await;
    gw.wait_log("modbus.write", &["register=\"defrost\""]).await;
    assert_eq!(sim.tables.lock().unwrap().coils.get(&(1, 1)), Some(&true));

    for (register, value, why) in [
        ("setpoint", "9", "outside"),
        ("setpoint", "warm", "not a number"),
        ("temp", "1", "not writable"),
        ("compressor", "1", "no register"),
    ] {
        command(register, value).await;
        let reg = format!("register={register:?}");
        gw.wait_log("modbus.write_refused", &[&reg, why]).await;
    }
    assert_eq!(
        sim.words(1, 20, 2),
        [0x40B0, 0x0000],
        "refused writes changed nothing"
    );
    assert!(gw.stop().await.success());
    assert_eq!(site.audit_count("modbus.write", "fridge-1"), 3);
    assert_eq!(site.audit_count("modbus.write_refused", "fridge-1"), 4);
    let _ = Duration::ZERO;
}

/// A pseudo-terminal pair made by socat, standing in for an RS-485 line; killed on drop.
struct SerialPair {
    socat: std::process::Child,
    pub gateway_end: std::path::PathBuf,
    pub device_end: std::path::PathBuf,
}

impl SerialPair {
    fn new(dir: &std::path::Path) -> SerialPair {
        crate::support::require("socat", "socat");
        let (gateway_end, device_end) = (dir.join("ttyGW"), dir.join("ttyDEV"));
        let socat = std::process::Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", gateway_end.display()))
            .arg(format!("pty,raw,echo=0,link={}", device_end.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run socat");
        let deadline = std::time::Instant::now() + crate::support::DEADLINE;
        while !(gateway_end.exists() && device_end.exists()) {
            assert!(
                std::time::Instant::now() < deadline,
                "socat made no pty pair"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        SerialPair {
            socat,
            gateway_end,
            device_end,
        }
    }
}

impl Drop for SerialPair {
    fn drop(&mut self) {
        let _ = self.socat.kill();
        let _ = self.socat.wait();
    }
}

#[tokio::test]
async fn an_rtu_bus_over_a_pseudo_terminal_pair_is_polled() {
    let mut site = modbus_site();
    let line = SerialPair::new(&site.path(""));
    let sim = Sim::start_rtu(&line.device_end);
    sim.set_words(7, 100, &[0x4148, 0x0000]); // 12.5 as f32
    site.extra = format!(
        "\n[[modbus.bus]]\nname = \"rs485\"\nserial = {:?}\nbaud = 19200\nparity = \"none\"\n\
         timeout = \"500ms\"\n\
         [[modbus.device]]\nid = \"fridge-1\"\nbus = \"rs485\"\nunit = 7\ninterval = \"200ms\"\n\
         [[modbus.device.register]]\nname = \"temp\"\nfunction = \"holding\"\naddress = 100\n\
         type = \"f32\"\nunit = \"degC\"\n",
        line.gateway_end.display().to_string()
    );
    let gw = site.start().await;
    let mut bms = Client::connect(&site, "bms-1", gw.port()).await;
    bms.subscribe("ward/+/modbus/#").await;
    let got = collect(&mut bms, |g| g.contains_key("ward/fridge-1/modbus/temp")).await;
    let v = &got["ward/fridge-1/modbus/temp"][0];
    assert_eq!(
        (v["value"].as_f64(), v["quality"].as_str()),
        (Some(12.5), Some("good")),
        "{v}"
    );
    assert_eq!(v["unit"], "degC");
    assert!(gw.stop().await.success());
}

/// pymodbus's server as a child process (from the virtualenv `scripts/test` makes); killed
/// on drop.
struct PyModbus {
    child: std::process::Child,
    port: u16,
}

impl PyModbus {
    async fn start() -> PyModbus {
        let python =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python");
        assert!(
            python.exists(),
            "no {}: scripts/test makes it (python3 -m venv target/pyvenv; pip install pymodbus==3.8.6)",
            python.display()
        );
        // A port from the OS, handed to pymodbus.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/system/pymodbus_device.py");
        let child = std::process::Command::new(python)
            .arg(script)
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start pymodbus");
        let deadline = tokio::time::Instant::now() + crate::support::DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pymodbus never listened on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        PyModbus { child, port }
    }
}

impl Drop for PyModbus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn values_from_pymodbus_an_independent_implementation_decode_the_same() {
    let py = PyModbus::start().await;
    let mut site = modbus_site();
    site.extra = format!(
        "\n[[modbus.bus]]\nname = \"py\"\ntcp = \"127.0.0.1:{}\"\n\
         [[modbus.device]]\nid = \"fridge-1\"\nbus = \"py\"\nunit = 1\ninterval = \"200ms\"\n\
         [[modbus.device.register]]\nname = \"temp\"\nfunction = \"holding\"\naddress = 0\ntype = \"f32\"\n\
         [[modbus.device.register]]\nname = \"count\"\nfunction = \"holding\"\naddress = 2\ntype = \"u32\"\nword_order = \"little\"\n\
         [[modbus.device.register]]\nname = \"small\"\nfunction = \"holding\"\naddress = 4\ntype = \"i16\"\n\
         [[modbus.device.register]]\nname = \"energy\"\nfunction = \"holding\"\naddress = 5\ntype = \"f64\"\n\
         [[modbus.device.register]]\nname = \"door\"\nfunction = \"coil\"\naddress = 0\n",
        py.port
    );
    let gw = site.start().await;
    let mut bms = Client::connect(&site, "bms-1", gw.port()).await;
    bms.subscribe("ward/+/modbus/#").await;
    let names = ["temp", "count", "small", "energy", "door"];
    let topic = |n: &str| format!("ward/fridge-1/modbus/{n}");
    let got = collect(&mut bms, |g| {
        names.iter().all(|n| g.contains_key(&topic(n)))
    })
    .await;
    let value = |n: &str| got[&topic(n)][0]["value"].clone();
    assert_eq!(value("temp"), 21.5);
    assert_eq!(value("count"), 65538.0);
    assert_eq!(value("small"), -5.0);
    assert_eq!(value("energy"), 1.5);
    assert_eq!(value("door"), true);
    assert!(gw.stop().await.success());
}
