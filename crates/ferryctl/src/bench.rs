//! `ferryctl bench VM --to HOST`: compression against raw transfer on the operator's own
//! hosts and link. The VM moves to the other agent and back once per codec and
//! repetition; every move is a real live migration, verified by the agents (RAM sums
//! compared before the commit, `--verify sent` or `full`), and timed from the agents'
//! own reports. Both agents' CPU time is read before and after each move (`GetHostFacts`).
//! The summary, the table and the SVG plot are pure functions of the rows.

use crate::cli::{BenchArgs, Compression};
use crate::connect::rpc_error;
use crate::report::{is_terminal, phase_name};
use anyhow::{bail, Context, Result};
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_client::FerryControlClient;
use serde::Serialize;
use std::time::Duration;
use tonic::transport::Channel;

type Client = FerryControlClient<Channel>;

/// One move of the benchmark.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Move {
    /// The codec asked for (`auto` included).
    pub codec: String,
    /// What the agent used (`auto: zstd:1` under auto).
    pub codec_used: String,
    /// Repetition, from 1.
    pub rep: u32,
    /// `there` (to --to) or `back`.
    pub direction: String,
    /// Source and target agent addresses.
    pub from: String,
    /// Target agent address.
    pub to: String,
    /// Start to end as the source agent reported it, ms (preflight included).
    pub total_ms: u64,
    /// Source STOP to target running, ms.
    pub downtime_ms: u64,
    /// Bytes on QUIC (pages and device state).
    pub wire_bytes: u64,
    /// Guest bytes the pages carried.
    pub page_bytes: u64,
    /// Guest bytes per payload byte.
    pub ratio: f64,
    /// Pre-copy rounds, the final one included.
    pub rounds: u32,
    /// CPU seconds of the source and target agents during the move.
    pub cpu_source_s: f64,
    /// CPU seconds of the target agent during the move.
    pub cpu_target_s: f64,
    /// How the RAM was verified and the fingerprint both sides agreed on.
    pub verify: String,
    /// The agreed RAM fingerprint (hex).
    pub ram_digest: String,
}

/// Medians over one codec's moves.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// The codec asked for.
    pub codec: String,
    /// What the agents used (distinct values, in order).
    pub used: Vec<String>,
    /// Moves measured.
    pub moves: usize,
    /// Medians.
    pub total_ms: f64,
    /// Median downtime, ms.
    pub downtime_ms: f64,
    /// Median bytes on the wire.
    pub wire_bytes: f64,
    /// Median ratio.
    pub ratio: f64,
    /// Median CPU seconds of the source agent.
    pub cpu_source_s: f64,
    /// Median CPU seconds of the target agent.
    pub cpu_target_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians per codec, in the order the codecs first appear. Pure.
pub fn summarize(moves: &[Move]) -> Vec<Summary> {
    let mut order: Vec<String> = Vec::new();
    for m in moves {
        if !order.contains(&m.codec) {
            order.push(m.codec.clone());
        }
    }
    order
        .into_iter()
        .map(|codec| {
            let ms: Vec<&Move> = moves.iter().filter(|m| m.codec == codec).collect();
            let col = |f: fn(&Move) -> f64| median(ms.iter().map(|m| f(m)).collect());
            let mut used: Vec<String> = Vec::new();
            for m in &ms {
                if !used.contains(&m.codec_used) {
                    used.push(m.codec_used.clone());
                }
            }
            Summary {
                codec,
                used,
                moves: ms.len(),
                total_ms: col(|m| m.total_ms as f64),
                downtime_ms: col(|m| m.downtime_ms as f64),
                wire_bytes: col(|m| m.wire_bytes as f64),
                ratio: col(|m| m.ratio),
                cpu_source_s: col(|m| m.cpu_source_s),
                cpu_target_s: col(|m| m.cpu_target_s),
            }
        })
        .collect()
}

/// The summary as a Markdown table (what `benches/RESULTS.md` takes as it is). Pure.
pub fn table(s: &[Summary]) -> String {
    let mut out = String::from(
        "| codec | moves | total ms | downtime ms | wire MiB | ratio | CPU s source agent | CPU s target agent | used |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in s {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} |\n",
            r.codec,
            r.moves,
            r.total_ms,
            r.downtime_ms,
            r.wire_bytes / f64::from(1u32 << 20),
            r.ratio,
            r.cpu_source_s,
            r.cpu_target_s,
            r.used.join(", ")
        ));
    }
    out
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A plot panel: its title, the value it shows, its colour.
type Panel = (&'static str, fn(&Summary) -> f64, &'static str);

/// Three bar charts side by side (total time, downtime, wire bytes per codec), as a
/// self-contained SVG. Pure.
pub fn svg_plot(title: &str, s: &[Summary]) -> String {
    let panels: [Panel; 3] = [
        ("total time (s)", |r| r.total_ms / 1000.0, "#2457c5"),
        ("downtime (ms)", |r| r.downtime_ms, "#e8833a"),
        (
            "wire (MiB)",
            |r| r.wire_bytes / f64::from(1u32 << 20),
            "#1e7f46",
        ),
    ];
    let (pw, ph, top, bottom) = (300.0, 220.0, 40.0, 40.0);
    let width = pw * panels.len() as f64 + 20.0;
    let height = top + ph + bottom;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">{}</text>\n",
        esc(title)
    );
    for (i, (name, value, color)) in panels.iter().enumerate() {
        let x0 = 10.0 + pw * i as f64;
        let max = s.iter().map(value).fold(0.0_f64, f64::max).max(1e-9);
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            x0 + 10.0,
            top - 4.0,
            esc(name)
        ));
        let n = s.len().max(1) as f64;
        let bw = ((pw - 40.0) / n).min(60.0);
        for (j, r) in s.iter().enumerate() {
            let v = value(r);
            let h = (ph - 20.0) * v / max;
            let x = x0 + 20.0 + bw * j as f64;
            let y = top + ph - h;
            out.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"><title>{}: {v:.2}</title></rect>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v:.1}</text>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                bw - 6.0,
                esc(&r.codec),
                x + (bw - 6.0) / 2.0,
                y - 3.0,
                x + (bw - 6.0) / 2.0,
                top + ph + 14.0,
                esc(&r.codec)
            ));
        }
    }
    out.push_str("</svg>\n");
    out
}

/// The agent's CPU seconds so far.
async fn agent_cpu(c: &mut Client, host: &str) -> Result<f64> {
    Ok(c.get_host_facts(pb::HostFactsRequest {})
        .await
        .map_err(|s| rpc_error(&format!("host facts of {host}"), s))?
        .into_inner()
        .agent_cpu_seconds)
}

/// Whether `vm` runs on the agent behind `c`.
async fn runs_on(c: &mut Client, vm: &str) -> Result<bool> {
    match c.get_vm(pb::VmRef { name: vm.into() }).await {
        Ok(v) => Ok(v.into_inner().state == pb::VmState::Running as i32),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
        Err(s) => Err(rpc_error(&format!("look up VM {vm}"), s)),
    }
}

/// One verified move from `src` to `dst`; the VM runs on `dst` afterwards.
#[allow(clippy::too_many_arguments)]
async fn one_move(
    src: &mut Client,
    dst: &mut Client,
    a: &BenchArgs,
    codec: &Compression,
    rep: u32,
    direction: &str,
    from: &str,
    to: &str,
) -> Result<Move> {
    let (cpu_s0, cpu_t0) = (agent_cpu(src, from).await?, agent_cpu(dst, to).await?);
    let started = src
        .start_migration(pb::StartMigrationRequest {
            vm: a.vm.clone(),
            target: to.to_string(),
            compress: codec.to_string(),
            downtime_ms: a.downtime.unwrap_or(0),
            bandwidth_bytes_per_sec: a.bandwidth.unwrap_or(0),
            verify: a.verify.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| {
            rpc_error(
                &format!("migrate {} from {from} to {to} ({codec})", a.vm),
                s,
            )
        })?
        .into_inner();
    let mut stream = src
        .watch_migration(pb::MigrationRef {
            id: started.id.clone(),
        })
        .await
        .map_err(|s| rpc_error(&format!("watch migration {}", started.id), s))?
        .into_inner();
    let end = tokio::time::timeout(a.timeout, async {
        let mut last = started.clone();
        while let Some(s) = stream.message().await.map_err(|s| rpc_error("watch", s))? {
            let done = is_terminal(s.phase());
            last = s;
            if done {
                break;
            }
        }
        Ok::<_, anyhow::Error>(last)
    })
    .await;
    let end = match end {
        Ok(r) => r?,
        Err(_) => {
            // Not left running behind the benchmark's back: cancelled (it rolls back
            // unless it is already committing).
            let _ = src
                .cancel_migration(pb::MigrationRef {
                    id: started.id.clone(),
                })
                .await;
            bail!(
                "migration {} ({codec}) did not end within {:?}: cancelled",
                started.id,
                a.timeout
            );
        }
    };
    if end.phase() != pb::MigrationPhase::Completed {
        bail!(
            "migration {} of {} from {from} to {to} ({codec}) ended {}: {}",
            end.id,
            a.vm,
            phase_name(end.phase()),
            end.error
        );
    }
    let st = end.stats.clone().unwrap_or_default();
    if st.ram_digest.is_empty() {
        bail!("migration {} completed without a RAM verification", end.id);
    }
    let (cpu_s1, cpu_t1) = (agent_cpu(src, from).await?, agent_cpu(dst, to).await?);
    Ok(Move {
        codec: codec.to_string(),
        codec_used: st.codec.clone(),
        rep,
        direction: direction.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        total_ms: u64::try_from(end.finished_unix_ms - end.started_unix_ms).unwrap_or(0),
        downtime_ms: st.downtime_ms,
        wire_bytes: st.wire_bytes,
        page_bytes: st.page_bytes,
        ratio: st.compression_ratio,
        rounds: st.rounds,
        cpu_source_s: (cpu_s1 - cpu_s0).max(0.0),
        cpu_target_s: (cpu_t1 - cpu_t0).max(0.0),
        verify: st.verify,
        ram_digest: st.ram_digest,
    })
}

/// Runs the benchmark: `a_addr` is where the VM runs (`--agent`), `b_addr` the other
/// agent. Prints a line per move and the table; writes the JSON and the plot. Stops at
/// the first failed move and says where the VM runs then (asked of both agents).
/// Both addresses are handed to the agents as targets, so each must reach the other:
/// a loopback `--agent` with a remote `--to` is refused.
pub async fn run(
    mut ca: Client,
    mut cb: Client,
    a_addr: &str,
    b_addr: &str,
    a: &BenchArgs,
) -> Result<u8> {
    let loopback = |addr: &str| crate::connect::is_loopback_host(crate::connect::host_of(addr));
    if loopback(a_addr) != loopback(b_addr) {
        bail!(
            "--agent {a_addr} and --to {b_addr}: one is a loopback address and the other is not, \
             but the agent at {b_addr} is told to migrate the VM back to {a_addr}: give \
             addresses both agents can reach"
        );
    }
    if !runs_on(&mut ca, &a.vm).await? {
        bail!(
            "VM {} is not running on {a_addr}: start it there first",
            a.vm
        );
    }
    if runs_on(&mut cb, &a.vm).await? {
        bail!(
            "VM {} also runs on {b_addr}: refusing to benchmark a VM on two hosts",
            a.vm
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let settle = Duration::from_secs_f64(a.settle.max(0.0));
    let mut moves: Vec<Move> = Vec::new();
    let mut failure = None;
    'outer: for codec in &a.codecs {
        for rep in 1..=a.repeat {
            for (direction, back) in [("there", false), ("back", true)] {
                tokio::time::sleep(settle).await;
                let r = if back {
                    one_move(&mut cb, &mut ca, a, codec, rep, direction, b_addr, a_addr).await
                } else {
                    one_move(&mut ca, &mut cb, a, codec, rep, direction, a_addr, b_addr).await
                };
                match r {
                    Ok(m) => {
                        eprintln!(
                            "{:<8} {rep} {:<5} {:>7} ms  downtime {:>5} ms  wire {:>8.1} MiB  {:.2}x  CPU {:.2} + {:.2} s  ({}, verified {})",
                            m.codec,
                            m.direction,
                            m.total_ms,
                            m.downtime_ms,
                            m.wire_bytes as f64 / f64::from(1u32 << 20),
                            m.ratio,
                            m.cpu_source_s,
                            m.cpu_target_s,
                            m.codec_used,
                            m.verify
                        );
                        moves.push(m);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break 'outer;
                    }
                }
            }
        }
    }
    let summary = summarize(&moves);
    let title = format!(
        "ferryctl bench {}: {a_addr} <-> {b_addr}, {} move(s), medians",
        a.vm,
        moves.len()
    );
    let json_path = a.out.join(format!("bench-{}.json", a.vm));
    let svg_path = a.out.join(format!("bench-{}.svg", a.vm));
    let doc = serde_json::json!({
        "vm": a.vm,
        "agents": [a_addr, b_addr],
        "verify": a.verify,
        "bandwidth_bytes_per_sec": a.bandwidth.unwrap_or(0),
        "moves": moves,
        "summary": summary,
        "failure": failure.as_ref().map(|e| format!("{e:#}")),
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&svg_path, svg_plot(&title, &summary))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    println!("{title}\n");
    print!("{}", table(&summary));
    println!("\nwrote {} and {}", json_path.display(), svg_path.display());
    match failure {
        Some(e) => {
            let on_a = runs_on(&mut ca, &a.vm).await;
            let on_b = runs_on(&mut cb, &a.vm).await;
            let place = match (on_a, on_b) {
                (Ok(true), Ok(false)) => format!("VM {} runs on {a_addr}", a.vm),
                (Ok(false), Ok(true)) => format!("VM {} runs on {b_addr}", a.vm),
                (x, y) => format!(
                    "VM {}: running on {a_addr}: {x:?}, on {b_addr}: {y:?} — check both",
                    a.vm
                ),
            };
            Err(e.context(format!(
                "benchmark stopped after {} move(s); {place}; results so far are in {}",
                moves.len(),
                json_path.display()
            )))
        }
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(codec: &str, total: u64, down: u64, wire: u64) -> Move {
        Move {
            codec: codec.into(),
            codec_used: codec.into(),
            rep: 1,
            direction: "there".into(),
            from: "a:1".into(),
            to: "b:1".into(),
            total_ms: total,
            downtime_ms: down,
            wire_bytes: wire,
            page_bytes: wire * 2,
            ratio: 2.0,
            rounds: 4,
            cpu_source_s: 1.0,
            cpu_target_s: 0.5,
            verify: "sent".into(),
            ram_digest: "ab".into(),
        }
    }

    #[test]
    fn medians_per_codec_in_first_seen_order() {
        let moves = vec![
            mv("lz4", 3000, 40, 100 << 20),
            mv("none", 2000, 30, 200 << 20),
            mv("lz4", 5000, 60, 120 << 20),
            mv("lz4", 4000, 50, 110 << 20),
        ];
        let s = summarize(&moves);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].codec, "lz4");
        assert_eq!(s[0].moves, 3);
        assert_eq!(s[0].total_ms, 4000.0);
        assert_eq!(s[0].downtime_ms, 50.0);
        assert_eq!(s[1].codec, "none");
        let t = table(&s);
        assert!(
            t.contains("| lz4 | 3 | 4000 | 50.0 | 110.0 | 2.00 | 1.00 | 0.50 | lz4 |"),
            "{t}"
        );
        assert_eq!(median(vec![1.0, 3.0]), 2.0);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn the_plot_has_a_bar_per_codec_and_panel() {
        let s = summarize(&[
            mv("none", 2000, 30, 200 << 20),
            mv("zstd:1", 3000, 45, 90 << 20),
        ]);
        let svg = svg_plot("t <&>", &s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=").count(), 6, "{svg}");
        assert!(svg.contains("t &lt;&amp;&gt;"));
    }
}
