//! The `system` adapter: the host itself as a device.
//!
//! It is the device of the embedded default config, so it must work on any
//! Linux machine with no hardware and no privileges. Everything comes from
//! procfs, sysfs and statvfs. procfs and sysfs answer from kernel memory,
//! but statvfs on a dead NFS or USB mount can block for good, so a poll runs
//! on the blocking pool, and a probe still stuck from an earlier poll is
//! reported rather than joined by another one.
//!
//! Attributes, each left out when the host does not provide it:
//!
//! | name | unit | source |
//! | --- | --- | --- |
//! | `cpu_temp` | °C | the CPU's zone in /sys/class/thermal |
//! | `load_1m`, `load_5m`, `load_15m` | | /proc/loadavg |
//! | `mem_used`, `mem_available` | MiB | /proc/meminfo |
//! | `disk_free` | MiB | statvfs of the data directory |
//! | `disk_free_<label>` | MiB | statvfs of each extra path in `disks` |
//! | `uptime` | s | /proc/uptime |
//! | `process_rss` | MiB | the gateway's own resident memory, /proc/self/status |

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::device::BoxFuture;
use crate::{Attribute, DeviceError, PolledDevice, Reading, Value};

/// The names of every attribute the system adapter can report, for config
/// validation (per-attribute deadbands name one of these).
pub const ATTRIBUTES: &[&str] = &[
    "cpu_temp",
    "load_1m",
    "load_5m",
    "load_15m",
    "mem_used",
    "mem_available",
    "disk_free",
    "uptime",
    "process_rss",
];

/// What the `system` device watches.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// The node name.
    pub node: String,
    /// The data directory, whose filesystem's free space is `disk_free`.
    /// It may not exist yet: its nearest existing ancestor is measured.
    pub data_dir: PathBuf,
    /// Extra filesystems to watch, `(label, path)`: `disk_free_<label>`.
    /// A missing path is a device error (an unmounted USB stick must show).
    pub disks: Vec<(String, PathBuf)>,
}

/// Polls the host.
#[derive(Debug, Clone)]
pub struct SystemPoller {
    config: Arc<SystemConfig>,
    thermal_zone: Option<PathBuf>,
    probing: Arc<AtomicBool>,
}

impl SystemPoller {
    /// A poller for this host; finds the CPU's thermal zone once.
    pub fn new(config: SystemConfig) -> Self {
        SystemPoller {
            config: Arc::new(config),
            thermal_zone: find_cpu_thermal_zone(Path::new("/sys/class/thermal")),
            probing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Reads every attribute now.
    pub fn read(&self) -> Result<Reading, DeviceError> {
        let mut attributes = Vec::with_capacity(ATTRIBUTES.len() + self.config.disks.len());
        let mut push = |name: &str, value: Value, unit: Option<&'static str>| {
            attributes.push(Attribute::new(name, value, unit));
        };
        if let Some(temp) = self.thermal_zone.as_deref().and_then(read_millidegrees) {
            push("cpu_temp", Value::Float(temp), Some("°C"));
        }
        if let Some([l1, l5, l15]) = read_loadavg() {
            push("load_1m", Value::Float(l1), None);
            push("load_5m", Value::Float(l5), None);
            push("load_15m", Value::Float(l15), None);
        }
        if let Some(mem) = read_meminfo() {
            push("mem_used", Value::Float(mib(mem.total_kib - mem.available_kib)), Some("MiB"));
            push("mem_available", Value::Float(mib(mem.available_kib)), Some("MiB"));
        }
        let data_fs = nearest_existing(&self.config.data_dir);
        match free_kib(&data_fs) {
            Ok(kib) => push("disk_free", Value::Float(mib(kib)), Some("MiB")),
            Err(e) => return Err(DeviceError::new(format!("data dir {}: {e}", data_fs.display()))),
        }
        for (label, path) in &self.config.disks {
            match free_kib(path) {
                Ok(kib) => push(&format!("disk_free_{label}"), Value::Float(mib(kib)), Some("MiB")),
                Err(e) => return Err(DeviceError::new(format!("disk {label} ({}): {e}", path.display()))),
            }
        }
        if let Some(secs) = read_first_number("/proc/uptime") {
            push("uptime", Value::Integer(secs as i64), Some("s"));
        }
        if let Some(kib) = read_status_kib("/proc/self/status", "VmRSS:") {
            push("process_rss", Value::Float(mib(kib)), Some("MiB"));
        }
        if attributes.is_empty() {
            return Err(DeviceError::new("the host reports nothing (is /proc mounted?)"));
        }
        Ok(Reading { node: self.config.node.clone(), ts: SystemTime::now(), attributes })
    }
}

impl PolledDevice for SystemPoller {
    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Reading>, DeviceError>> {
        let probe = self.clone();
        Box::pin(async move {
            if probe.probing.swap(true, Ordering::AcqRel) {
                return Err(DeviceError::new(
                    "the previous probe of the host has not returned (a hung filesystem?)",
                ));
            }
            let busy = probe.probing.clone();
            let result = tokio::task::spawn_blocking(move || {
                let result = probe.read();
                busy.store(false, Ordering::Release);
                result
            })
            .await;
            match result {
                Ok(reading) => reading.map(|r| vec![r]),
                Err(e) => Err(DeviceError::new(format!("the host probe failed: {e}"))),
            }
        })
    }
}

/// KiB to MiB, rounded to 0.1 MiB: finer digits are noise that would defeat
/// on-change publishing.
fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// The zone whose type names the CPU (`cpu-thermal` on a Raspberry Pi,
/// `x86_pkg_temp` on a PC), else the first zone that reads.
fn find_cpu_thermal_zone(root: &Path) -> Option<PathBuf> {
    let mut zones: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("thermal_zone")))
        .collect();
    zones.sort();
    let is_cpu = |zone: &PathBuf| {
        std::fs::read_to_string(zone.join("type")).is_ok_and(|t| {
            let t = t.to_ascii_lowercase();
            t.contains("cpu") || t.contains("x86_pkg") || t.contains("soc")
        })
    };
    let readable: Vec<PathBuf> =
        zones.into_iter().map(|z| z.join("temp")).filter(|t| read_millidegrees(t).is_some()).collect();
    readable
        .iter()
        .find(|t| t.parent().is_some_and(|z| is_cpu(&z.to_path_buf())))
        .or(readable.first())
        .cloned()
}

fn read_millidegrees(path: &Path) -> Option<f64> {
    let raw: i64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Some((raw as f64 / 100.0).round() / 10.0)
}

fn read_loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

struct MemInfo {
    total_kib: u64,
    available_kib: u64,
}

fn read_meminfo() -> Option<MemInfo> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kib = field_kib(&text, "MemTotal:")?;
    let available_kib = field_kib(&text, "MemAvailable:")?;
    Some(MemInfo { total_kib, available_kib: available_kib.min(total_kib) })
}

fn read_status_kib(path: &str, key: &str) -> Option<u64> {
    field_kib(&std::fs::read_to_string(path).ok()?, key)
}

/// The number after `key` on its line of a `key: N kB` file.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn read_first_number(path: &str) -> Option<f64> {
    std::fs::read_to_string(path).ok()?.split_whitespace().next()?.parse().ok()
}

fn free_kib(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize) / 1024)
}

fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path;
    loop {
        if p.exists() {
            return p.to_path_buf();
        }
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => return PathBuf::from("."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poller(disks: Vec<(String, PathBuf)>) -> SystemPoller {
        SystemPoller::new(SystemConfig {
            node: "host".into(),
            data_dir: std::env::temp_dir().join("fieldmq-not-created-yet/state"),
            disks,
        })
    }

    fn number(reading: &Reading, name: &str) -> f64 {
        let attr = reading.attributes.iter().find(|a| a.name == name);
        attr.and_then(|a| a.value.as_f64()).unwrap_or_else(|| panic!("no numeric {name}"))
    }

    #[test]
    fn reads_real_values_from_this_host() {
        let reading = poller(vec![]).read().expect("the host answers");
        assert_eq!(reading.node, "host");
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let total_mib = field_kib(&meminfo, "MemTotal:").unwrap() as f64 / 1024.0;
        let used = number(&reading, "mem_used");
        let available = number(&reading, "mem_available");
        assert!(used > 0.0 && available > 0.0, "used {used} available {available}");
        assert!((used + available - total_mib).abs() < 1.0, "used + available = total");
        assert!(number(&reading, "load_1m") >= 0.0);
        assert!(number(&reading, "uptime") > 0.0);
        // This test process itself holds some memory, and far less than the machine.
        let rss = number(&reading, "process_rss");
        assert!(rss > 0.5 && rss < total_mib, "rss {rss}");
        // The data dir does not exist yet: the free space of its nearest
        // ancestor (the temp dir's filesystem) is reported instead.
        let temp_free = free_kib(&std::env::temp_dir()).unwrap() as f64 / 1024.0;
        assert!((number(&reading, "disk_free") - temp_free).abs() < 64.0);
        let units: Vec<_> = reading.attributes.iter().map(|a| (a.name.as_str(), a.unit.as_deref())).collect();
        assert!(units.contains(&("mem_used", Some("MiB"))));
        assert!(reading.attributes.iter().all(|a| ATTRIBUTES.contains(&a.name.as_str())));
    }

    #[tokio::test]
    async fn a_poll_reads_on_the_blocking_pool_and_can_run_again() {
        let mut p = poller(vec![]);
        for _ in 0..2 {
            let readings = p.poll().await.expect("the host answers");
            assert_eq!(readings.len(), 1);
            assert!(readings[0].attributes.iter().any(|a| a.name == "uptime"));
        }
    }

    #[test]
    fn an_extra_disk_is_reported_under_its_label() {
        let reading = poller(vec![("root".into(), "/".into())]).read().unwrap();
        assert!(number(&reading, "disk_free_root") > 0.0);
    }

    #[test]
    fn a_missing_disk_is_a_device_error_naming_it() {
        let err = poller(vec![("usb".into(), "/nonexistent/fieldmq-usb".into())]).read().unwrap_err();
        assert_eq!(
            err.reason(),
            "disk usb (/nonexistent/fieldmq-usb): No such file or directory (os error 2)"
        );
    }

    #[test]
    fn the_cpu_zone_is_preferred_over_other_zones() {
        let root = std::env::temp_dir().join(format!("fieldmq-thermal-{}", std::process::id()));
        for (zone, kind, temp) in
            [("thermal_zone0", "acpitz", "27800"), ("thermal_zone1", "cpu-thermal", "48312")]
        {
            std::fs::create_dir_all(root.join(zone)).unwrap();
            std::fs::write(root.join(zone).join("type"), kind).unwrap();
            std::fs::write(root.join(zone).join("temp"), temp).unwrap();
        }
        let zone = find_cpu_thermal_zone(&root).unwrap();
        assert_eq!(read_millidegrees(&zone), Some(48.3));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
