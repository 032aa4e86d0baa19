//! Probing a QEMU binary: version and machine types.

use std::path::Path;
use std::process::Stdio;

use ferry_qmp::QemuVersion;

use crate::QemuError;

async fn run(binary: &Path, args: &[&str]) -> Result<String, QemuError> {
    let command = format!("{} {}", binary.display(), args.join(" "));
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| QemuError::io(format!("running `{command}`"), e))?;
    if !out.status.success() {
        return Err(QemuError::ProbeFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The version of a QEMU binary, from `BINARY --version`.
pub async fn qemu_version(binary: &Path) -> Result<QemuVersion, QemuError> {
    let out = run(binary, &["--version"]).await?;
    parse_version(&out).ok_or_else(|| QemuError::ProbeParse {
        command: format!("{} --version", binary.display()),
        output: out.chars().take(200).collect(),
    })
}

/// The machine types a QEMU binary supports (including aliases such as
/// `pc`), from `BINARY -machine help`.
pub async fn machine_types(binary: &Path) -> Result<Vec<String>, QemuError> {
    let out = run(binary, &["-machine", "help"]).await?;
    let types = parse_machine_types(&out);
    if types.is_empty() {
        return Err(QemuError::ProbeParse {
            command: format!("{} -machine help", binary.display()),
            output: out.chars().take(200).collect(),
        });
    }
    Ok(types)
}

/// `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2...)` -> 10.0.2.
fn parse_version(out: &str) -> Option<QemuVersion> {
    let first = out.lines().next()?;
    let rest = &first[first.find("version ")? + "version ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// First word of every line after the "Supported machines are:" header.
fn parse_machine_types(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("Supported machines"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_lines() {
        let v = parse_version(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025\n",
        );
        assert_eq!(v, Some(QemuVersion::new(10, 0, 2)));
        let v = parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)\n");
        assert_eq!(v, Some(QemuVersion::new(7, 2, 19)));
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn parses_machine_list() {
        let out = "Supported machines are:\n\
                   microvm              microvm (i386)\n\
                   pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n\
                   pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\n\
                   pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996)\n\
                   none                 empty machine\n";
        assert_eq!(
            parse_machine_types(out),
            ["microvm", "pc", "pc-i440fx-10.0", "pc-i440fx-7.2", "none"]
        );
    }
}
