//! Slowing a guest down when pre-copy cannot keep up: the QEMU process goes into a cgroup
//! of its own whose CPU quota is lowered step by step (cgroup v2 `cpu.max`, or v1
//! `cpu.cfs_quota_us` where the cpu controller is on the v1 hierarchy, as on these hosts).

use std::path::{Path, PathBuf};

const PERIOD_US: u64 = 100_000;

/// A QEMU process under a CPU quota. Dropping it does not undo: call [`CpuThrottle::release`].
pub struct CpuThrottle {
    dir: PathBuf,
    parent_procs: PathBuf,
    v2: bool,
    pid: u32,
    /// Current quota as a percentage of one CPU.
    pub percent: u32,
}

impl CpuThrottle {
    /// Moves `pid` into a new cgroup named after the VM (no limit yet).
    pub fn attach(vm: &str, pid: u32) -> std::io::Result<CpuThrottle> {
        let root = Path::new("/sys/fs/cgroup");
        let (base, v2) = if root.join("cgroup.controllers").exists() {
            // v2: the cpu controller must be enabled for children of the root.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
            (root.to_path_buf(), true)
        } else if root.join("cpu/cgroup.procs").exists() {
            (root.join("cpu"), false)
        } else {
            return Err(std::io::Error::other(
                "no cgroup cpu controller found under /sys/fs/cgroup",
            ));
        };
        let dir = base.join(format!("ferry-{vm}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        Ok(CpuThrottle {
            dir,
            parent_procs: base.join("cgroup.procs"),
            v2,
            pid,
            percent: 100,
        })
    }

    /// Limits the process to `percent` of one CPU.
    pub fn set(&mut self, percent: u32) -> std::io::Result<()> {
        let quota = PERIOD_US * u64::from(percent.max(1)) / 100;
        if self.v2 {
            std::fs::write(self.dir.join("cpu.max"), format!("{quota} {PERIOD_US}"))?;
        } else {
            std::fs::write(self.dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
            std::fs::write(self.dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        }
        self.percent = percent;
        Ok(())
    }

    /// Next step down: 50%, 20%, 10%, 5% of one CPU. `false` when already at the floor.
    pub fn step_down(&mut self) -> std::io::Result<bool> {
        let next = match self.percent {
            p if p > 50 => 50,
            p if p > 20 => 20,
            p if p > 10 => 10,
            p if p > 5 => 5,
            _ => return Ok(false),
        };
        self.set(next)?;
        Ok(true)
    }

    /// Lifts the limit: the process goes back to the parent cgroup, the cgroup is removed.
    pub fn release(self) {
        if self.v2 {
            let _ = std::fs::write(self.dir.join("cpu.max"), format!("max {PERIOD_US}"));
        } else {
            let _ = std::fs::write(self.dir.join("cpu.cfs_quota_us"), "-1");
        }
        let _ = std::fs::write(&self.parent_procs, self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}
