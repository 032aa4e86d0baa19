//! Builds the LD_PRELOAD shim (shim/uffd_shim.c) into $OUT_DIR/libferry_uffd_shim.so with the
//! C compiler the `cc` crate finds for the target; the library embeds it with include_bytes!.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "shim/uffd_shim.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let out = out_dir.join("libferry_uffd_shim.so");
    let compiler = cc::Build::new().get_compiler();
    let mut cmd: Command = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-o"])
        .arg(&out)
        .arg(src);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run C compiler {:?}: {e}", compiler.path()));
    if !status.success() {
        panic!("building {src} failed ({status}): {cmd:?}");
    }
}
