//! Block-layer commands for moving disks during a live migration: the target exports
//! its fresh images over NBD, the source mirrors into them (see
//! `notes/qemu-mechanics.md` for the verified sequence and its traps).

use serde::Deserialize;
use serde_json::json;

use crate::{QmpClient, QmpError};

/// One entry of `query-block-jobs` (tolerant: fields differ across versions).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct BlockJobInfo {
    /// Job id (`device` in the reply).
    pub device: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Bytes to copy (grows while the guest writes).
    pub len: u64,
    /// Bytes copied.
    pub offset: u64,
    /// READY: the bulk copy is done and target follows source.
    pub ready: bool,
    pub status: String,
}

/// How a mirror treats guest writes while it copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorCopyMode {
    /// Guest writes complete at once; the mirror catches up later.
    Background,
    /// Guest writes complete only once written to the target too: the mirror cannot fall behind.
    WriteBlocking,
}

impl MirrorCopyMode {
    fn as_str(self) -> &'static str {
        match self {
            MirrorCopyMode::Background => "background",
            MirrorCopyMode::WriteBlocking => "write-blocking",
        }
    }
}

impl QmpClient {
    /// `nbd-server-start` on a unix socket (the nested address form this command takes).
    pub async fn nbd_server_start_unix(&self, path: &str) -> Result<(), QmpError> {
        self.execute_unit(
            "nbd-server-start",
            Some(json!({"addr": {"type": "unix", "data": {"path": path}}})),
        )
        .await
    }

    /// `nbd-server-stop`.
    pub async fn nbd_server_stop(&self) -> Result<(), QmpError> {
        self.execute_unit("nbd-server-stop", None).await
    }

    /// `block-export-add` of block node `node` as NBD export `name`.
    pub async fn block_export_add_nbd(
        &self,
        id: &str,
        node: &str,
        name: &str,
        writable: bool,
    ) -> Result<(), QmpError> {
        self.execute_unit(
            "block-export-add",
            Some(json!({"type": "nbd", "id": id, "node-name": node, "name": name, "writable": writable})),
        )
        .await
    }

    /// `block-export-del`.
    pub async fn block_export_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute_unit("block-export-del", Some(json!({"id": id})))
            .await
    }

    /// `blockdev-add` of an NBD client node on a unix socket (the flat address form).
    pub async fn blockdev_add_nbd_unix(
        &self,
        node: &str,
        path: &str,
        export: &str,
    ) -> Result<(), QmpError> {
        self.execute_unit(
            "blockdev-add",
            Some(json!({"driver": "nbd", "node-name": node, "server": {"type": "unix", "path": path}, "export": export})),
        )
        .await
    }

    /// `blockdev-del`.
    pub async fn blockdev_del(&self, node: &str) -> Result<(), QmpError> {
        self.execute_unit("blockdev-del", Some(json!({"node-name": node})))
            .await
    }

    /// `blockdev-mirror` of `device` into node `target`, whole disk (`sync: full`).
    pub async fn blockdev_mirror(
        &self,
        job: &str,
        device: &str,
        target: &str,
        mode: MirrorCopyMode,
    ) -> Result<(), QmpError> {
        self.execute_unit(
            "blockdev-mirror",
            Some(json!({"job-id": job, "device": device, "target": target, "sync": "full", "copy-mode": mode.as_str()})),
        )
        .await
    }

    /// `block-job-change` of a mirror's copy mode (QEMU 8.2 and later).
    pub async fn block_job_set_copy_mode(
        &self,
        job: &str,
        mode: MirrorCopyMode,
    ) -> Result<(), QmpError> {
        self.execute_unit(
            "block-job-change",
            Some(json!({"id": job, "type": "mirror", "copy-mode": mode.as_str()})),
        )
        .await
    }

    /// `block-job-cancel`. On a READY mirror (without `force`) this completes the job with
    /// source and target in sync and leaves the guest on its own disk.
    pub async fn block_job_cancel(&self, job: &str, force: bool) -> Result<(), QmpError> {
        self.execute_unit(
            "block-job-cancel",
            Some(json!({"device": job, "force": force})),
        )
        .await
    }

    /// `query-block-jobs`.
    pub async fn query_block_jobs(&self) -> Result<Vec<BlockJobInfo>, QmpError> {
        self.execute_as("query-block-jobs", None).await
    }
}
