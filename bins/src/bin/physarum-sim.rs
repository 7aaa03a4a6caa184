//! `physarum-sim run <scenario-file> --seed N`: run a scenario in the deterministic
//! simulation and print a timeline summary, the figures and the trace hash. The same
//! file, seed and engine always give the same trace hash. Two engines run the same
//! scenarios: turmoil (the full stack: real HTTP, the shared runtime, simulated TCP)
//! and the event-driven engine (the same core machines on a Kademlia model, for
//! large clusters); `--engine auto` picks turmoil up to 30 nodes.
//!
//! `physarum-sim scale N` writes the scale scenario with N nodes; `physarum-sim
//! curve` runs the scale scenarios and plots the discovery cost over n.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use physarum::plot;
use physarum_net_sim::des::CostSummary;
use physarum_net_sim::node::Fate;
use physarum_net_sim::scale::scale_scenario;
use physarum_net_sim::scenario::PlacementSpec;
use physarum_net_sim::timeline::Timeline;
use physarum_net_sim::{run_des, run_des_with_progress, run_with_progress, Report, Scenario};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "physarum-sim", about = "Run physarum scenarios in the deterministic cluster simulation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// turmoil up to 30 nodes, the event-driven engine beyond.
    Auto,
    Turmoil,
    Des,
}

/// Largest cluster `--engine auto` runs on turmoil.
const AUTO_TURMOIL_MAX_NODES: usize = 30;

#[derive(Subcommand)]
enum Command {
    /// Run one scenario file (JSON) with one seed.
    Run {
        /// The scenario file (see scenarios/ in the repository).
        file: PathBuf,
        /// The seed that decides everything random in the run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = Engine::Auto)]
        engine: Engine,
        /// Also print the whole trace.
        #[arg(long)]
        trace: bool,
        /// Leave out the timeline.
        #[arg(long)]
        quiet: bool,
        /// Write the timeline (timeline.jsonl, requests.csv) and its plot
        /// (timeline.png, timeline.svg) into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A TrueType font for the plot's labels.
        #[arg(long, default_value = plot::DEFAULT_FONT)]
        font: PathBuf,
        /// Run with this placement policy instead of the scenario's (lowest_rtt,
        /// least_loaded, rtt_load_cost; parameters as NAME:KEY=VALUE,KEY=VALUE).
        #[arg(long)]
        placement: Option<String>,
    },
    /// Run a scenario with many seeds and plot the distribution of the first
    /// request's response time (a cold allocation: discovery, start, first answer).
    FirstResponse {
        file: PathBuf,
        /// Seeds 1 to N.
        #[arg(long, default_value_t = 30)]
        seeds: u64,
        #[arg(long, value_enum, default_value_t = Engine::Auto)]
        engine: Engine,
        /// Where first-response.png and first-response.csv go.
        #[arg(long)]
        out: PathBuf,
        /// A published median to mark, in ms, and its label.
        #[arg(long)]
        reference_ms: Option<f64>,
        #[arg(long, default_value = "published median")]
        reference_label: String,
        #[arg(long, default_value = plot::DEFAULT_FONT)]
        font: PathBuf,
    },
    /// Check that a scenario file parses and is consistent, without running it.
    Check { file: PathBuf },
    /// Write the scale scenario with N nodes (scenarios/scale-N.json) to stdout.
    Scale { nodes: usize },
    /// Run the scale scenarios on the event-driven engine and plot the discovery cost.
    Curve {
        /// Cluster sizes.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the PNG and the table go.
        #[arg(long, default_value = "docs")]
        out: PathBuf,
        /// A TrueType font for the labels.
        #[arg(long, default_value = plot::DEFAULT_FONT)]
        font: PathBuf,
    },
}

/// `NAME` or `NAME:KEY=VALUE,KEY=VALUE`.
fn placement_spec(text: &str) -> anyhow::Result<PlacementSpec> {
    let (policy, rest) = text.split_once(':').unwrap_or((text, ""));
    let mut params = std::collections::BTreeMap::new();
    for kv in rest.split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').with_context(|| format!("placement parameter {kv:?}: use KEY=VALUE"))?;
        let v: f64 = v.parse().with_context(|| format!("placement parameter {k:?}: {v:?} is not a number"))?;
        params.insert(k.to_string(), v);
    }
    Ok(PlacementSpec { policy: policy.to_string(), params })
}

fn load(file: &PathBuf) -> anyhow::Result<Scenario> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Scenario::from_json(&text).with_context(|| format!("{}", file.display()))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("physarum-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Wall time between two progress lines on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

fn run_with(s: &Scenario, seed: u64, engine: Engine) -> anyhow::Result<(Report, &'static str)> {
    let des = match engine {
        Engine::Auto => s.nodes.len() > AUTO_TURMOIL_MAX_NODES,
        Engine::Turmoil => false,
        Engine::Des => true,
    };
    // Long runs say how far they are, on stderr (stdout stays the same for one seed).
    let started = std::time::Instant::now();
    let mut last = started;
    let total = s.duration_ms as f64 / 1000.0;
    let mut progress = |at: Duration| {
        if last.elapsed() >= PROGRESS_EVERY {
            last = std::time::Instant::now();
            eprintln!(
                "progress: {:.0} of {total:.0} simulated s ({:.0} %), {:.0} s wall",
                at.as_secs_f64(),
                100.0 * at.as_secs_f64() / total.max(1e-9),
                started.elapsed().as_secs_f64()
            );
        }
    };
    let (report, name) = match des {
        true => (run_des_with_progress(s, seed, &mut progress), "des"),
        false => (run_with_progress(s, seed, &mut progress), "turmoil"),
    };
    Ok((report.map_err(anyhow::Error::msg)?, name))
}

/// `run --out DIR`: the timeline as data and as a picture.
fn write_outputs(s: &Scenario, report: &Report, dir: &Path, font: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tl = Timeline::of(s, report);
    std::fs::write(dir.join("timeline.jsonl"), tl.jsonl())?;
    std::fs::write(dir.join("requests.csv"), tl.requests_csv())?;
    plot::register_font(font)?;
    let title = format!("{} — seed {}", s.name, report.seed);
    let written = plot::write_timeline_plots(&tl, dir, &title)?;
    println!("wrote {}", dir.join("timeline.jsonl").display());
    println!("wrote {}", dir.join("requests.csv").display());
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Check { file } => {
            let s = load(&file)?;
            println!(
                "{}: scenario {:?}, {} nodes, {} faults, {} workloads: ok",
                file.display(),
                s.name,
                s.nodes.len(),
                s.schedule.len(),
                s.workloads.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { file, seed, engine, trace, quiet, out, font, placement } => {
            let mut s = load(&file)?;
            if let Some(p) = &placement {
                s.placement = Some(placement_spec(p)?);
                s.validate()?;
            }
            let (report, engine_name) = run_with(&s, seed, engine)?;
            eprintln!("{}", report.wall_text());
            if !quiet {
                println!("--- timeline ---");
                print!("{}", report.timeline());
            }
            if trace {
                println!("--- trace ---");
                print!("{}", report.trace.text());
            }
            println!("--- summary ---");
            println!("engine: {engine_name}");
            print!("{}", report.summary());
            if let Some(d) = &report.dht {
                print!("{}", cost_text(&d.summary()));
            }
            let policy = placement.map(|p| format!(" --placement {p}")).unwrap_or_default();
            println!("replay: physarum-sim run {} --seed {seed} --engine {engine_name}{policy}", file.display());
            if let Some(dir) = out {
                write_outputs(&s, &report, &dir, &font)?;
            }
            Ok(if report.violations.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::FirstResponse { file, seeds, engine, out, reference_ms, reference_label, font } => {
            let s = load(&file)?;
            let mut csv = String::from("seed,first_response_ms\n");
            let mut values = Vec::new();
            for seed in 1..=seeds {
                let (report, _) = run_with(&s, seed, engine)?;
                let first = report.requests.iter().min_by_key(|r| (r.at, r.seq));
                if let Some(physarum_net_sim::node::Fate::Answered { status: 200..=299, latency, .. }) =
                    first.map(|r| &r.fate)
                {
                    let ms = latency.as_secs_f64() * 1000.0;
                    let _ = writeln!(csv, "{seed},{ms:.3}");
                    values.push(ms);
                } else {
                    let _ = writeln!(csv, "{seed},");
                }
            }
            anyhow::ensure!(!values.is_empty(), "no run answered its first request");
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[(sorted.len() - 1) / 2];
            let p90 = sorted[((sorted.len() as f64 * 0.9).ceil() as usize).clamp(1, sorted.len()) - 1];
            println!(
                "first response over {} of {seeds} seeds: median {median:.1} ms, p90 {p90:.1} ms, max {:.1} ms",
                values.len(),
                sorted[sorted.len() - 1]
            );
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("first-response.csv"), csv)?;
            plot::register_font(&font)?;
            let mut markers = vec![(median, format!("simulated median {:.2} s", median / 1000.0))];
            if let Some(r) = reference_ms {
                markers.push((r, format!("{reference_label} {:.2} s", r / 1000.0)));
            }
            let title = format!("{}: first response (cold allocation)", s.name);
            plot::cdf_png(&values, &markers, &out.join("first-response.png"), &title, "first response, ms")?;
            println!("wrote {}", out.join("first-response.png").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Scale { nodes } => {
            println!("{}", scale_scenario(nodes).to_json());
            Ok(ExitCode::SUCCESS)
        }
        Command::Curve { sizes, seed, out, font } => curve(&sizes, seed, &out, &font),
    }
}

fn cost_text(c: &CostSummary) -> String {
    format!(
        "discovery: {} lookups, messages p50 {} p99 {}, hops p50 {} p99 {}, latency p50 {:.3} ms p99 {:.3} ms; \
         {} allocations, at most {} allocators probed, chosen allocator {:.3} ms vs closest {:.3} ms (median), \
         excess p50 {:.3} ms p90 {:.3} ms\n",
        c.lookups,
        c.rpcs_p50,
        c.rpcs_p99,
        c.hops_p50,
        c.hops_p99,
        c.took_p50.as_secs_f64() * 1000.0,
        c.took_p99.as_secs_f64() * 1000.0,
        c.allocations,
        c.probes_max,
        c.chosen_p50_ms,
        c.best_p50_ms,
        c.excess_p50_ms,
        c.excess_p90_ms
    )
}

/// One point of the curve.
struct Point {
    n: usize,
    cost: CostSummary,
    wall_s: f64,
    ok: u64,
    sent: u64,
    allocators: usize,
    /// Allocators whose instances served a request.
    serving: usize,
}

fn curve(sizes: &[usize], seed: u64, out: &Path, font: &Path) -> anyhow::Result<ExitCode> {
    let mut points = Vec::new();
    for &n in sizes {
        let s = scale_scenario(n);
        let r = run_des(&s, seed).map_err(anyhow::Error::msg)?;
        let cost = r.dht.as_ref().map(|d| d.summary()).unwrap_or_default();
        println!("n = {n}: {:.1} s wall; {}", r.wall.as_secs_f64(), cost_text(&cost));
        let serving: std::collections::BTreeSet<&str> = r
            .requests
            .iter()
            .filter_map(|q| match &q.fate {
                Fate::Answered { served_by: Some(by), .. } => by.split('~').next(),
                _ => None,
            })
            .collect();
        let (ok, sent, allocators) = (r.figures.ok, r.figures.sent, s.allocators().len());
        points.push(Point { n, cost, wall_s: r.wall.as_secs_f64(), ok, sent, allocators, serving: serving.len() });
    }
    std::fs::create_dir_all(out)?;
    let mut table = String::from(
        "| nodes | lookups | messages p50 / p99 | hops p50 / p99 | lookup latency p50 / p99 (ms) | allocators probed (max) | chosen vs closest allocator, median (ms) | excess p50 / p90 (ms) | requests ok | wall (s) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in &points {
        let c = &p.cost;
        let _ = writeln!(
            table,
            "| {} | {} | {} / {} | {} / {} | {:.2} / {:.2} | {} | {:.2} vs {:.2} | {:.2} / {:.2} | {} of {} | {:.1} |",
            p.n,
            c.lookups,
            c.rpcs_p50,
            c.rpcs_p99,
            c.hops_p50,
            c.hops_p99,
            c.took_p50.as_secs_f64() * 1000.0,
            c.took_p99.as_secs_f64() * 1000.0,
            c.probes_max,
            c.chosen_p50_ms,
            c.best_p50_ms,
            c.excess_p50_ms,
            c.excess_p90_ms,
            p.ok,
            p.sent,
            p.wall_s
        );
    }
    let mut closeness = String::from(
        "\n## How close the chosen allocator is\n\n\
         Every allocation is a sample: the RTT from the client to the allocator that started its instance, \
         against the RTT to the closest allocator up and reachable at that moment (over all allocators, \
         not only those the client saw). A client probes the allocators that a provider lookup of the \
         allocators' rendezvous key returns: at most 20 from each node that answers (libp2p-kad's cap). \
         Each store keeps the first 20 providers of a key to arrive and ignores later ones while those live \
         (libp2p-kad's memory store does the same, so production behaves alike): the candidates are picked \
         by arrival order at the nodes the lookup asks, not by place. How close the choice comes depends on \
         how those candidates happen to spread over the network, and allocators that are in no store's first \
         20 get no instances. No network coordinates (Vivaldi) are used yet.\n\n",
    );
    for p in &points {
        let c = &p.cost;
        let _ =
            writeln!(
            closeness,
            "- {} nodes: the chosen allocator is {:.2} ms away at the median, the closest {:.2} ms; the chosen one \
             is {:.2} ms farther at the median and {:.2} ms at p90. At most {} of the {} allocators probed; \
             instances ran on {} of them.",
            p.n, c.chosen_p50_ms, c.best_p50_ms, c.excess_p50_ms, c.excess_p90_ms, c.probes_max, p.allocators, p.serving
        );
    }
    let sizes_text: Vec<String> = sizes.iter().map(|n| n.to_string()).collect();
    let md = format!(
        "# Discovery cost over cluster size\n\nMeasured with `cargo run --release -p physarum --bin physarum-sim -- curve --sizes {} --seed {seed}` \
         (the scale scenarios, `physarum-sim scale N`, on the event-driven engine with the Kademlia model).\n\n![discovery cost](discovery-cost.png)\n\n{table}{closeness}",
        sizes_text.join(",")
    );
    std::fs::write(out.join("discovery-cost.md"), md)?;
    plot(&points, &out.join("discovery-cost.png"), font)?;
    println!("wrote {} and {}", out.join("discovery-cost.png").display(), out.join("discovery-cost.md").display());
    Ok(ExitCode::SUCCESS)
}

fn plot(points: &[Point], path: &Path, font: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    plot::register_font(font)?;
    let root = BitMapBackend::new(path, (1500, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let n_max = points.iter().map(|p| p.n).max().unwrap_or(10) as f64 * 1.5;
    let n_min = points.iter().map(|p| p.n).min().unwrap_or(10) as f64 / 1.5;
    type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
    let draw = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                title: &str,
                y_desc: &str,
                series: Vec<Series>|
     -> anyhow::Result<()> {
        let y_max = series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).fold(0.0f64, f64::max).max(1e-3) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((n_min..n_max).log_scale(), 0.0..y_max)?;
        chart.configure_mesh().x_desc("nodes (log scale)").y_desc(y_desc).label_style(("sans-serif", 15)).draw()?;
        for (label, color, pts) in series {
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
        Ok(())
    };
    let xs = |f: &dyn Fn(&CostSummary) -> f64| points.iter().map(|p| (p.n as f64, f(&p.cost))).collect::<Vec<_>>();
    let blue = RGBColor(31, 119, 180);
    let red = RGBColor(214, 39, 40);
    draw(
        &panels[0],
        "Messages per provider lookup",
        "Kademlia RPCs",
        vec![("p50", blue, xs(&|c| c.rpcs_p50 as f64)), ("p99", red, xs(&|c| c.rpcs_p99 as f64))],
    )?;
    draw(
        &panels[1],
        "Latency per provider lookup",
        "simulated ms",
        vec![
            ("p50", blue, xs(&|c| c.took_p50.as_secs_f64() * 1000.0)),
            ("p99", red, xs(&|c| c.took_p99.as_secs_f64() * 1000.0)),
        ],
    )?;
    draw(
        &panels[2],
        "Allocator chosen vs the closest",
        "RTT, ms (median)",
        vec![("chosen", blue, xs(&|c| c.chosen_p50_ms)), ("closest", red, xs(&|c| c.best_p50_ms))],
    )?;
    root.present()?;
    Ok(())
}
