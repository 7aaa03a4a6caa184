//! Pictures of simulation runs (`physarum-sim`): the timeline figure (per-request
//! latency coloured by the host that served it, faults shaded, the scheduled links'
//! RTTs beneath with the service's soft and hard limits), as PNG and SVG. Fonts are
//! loaded at run time from a TrueType file (no system font lookup).

use anyhow::Context;
use physarum_net_sim::timeline::{Row, Timeline};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The font `physarum-sim` uses unless told otherwise.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Make `font` the "sans-serif" family of the bitmap backend.
pub fn register_font(font: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(font).with_context(|| format!("cannot read the font {}", font.display()))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", font.display()))
}

/// Colours that stay apart for the eye (matplotlib's tab10 without its red, kept
/// for failures, and its grey, kept for "other hosts").
const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(128, 0, 0),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const FAILED: RGBColor = RGBColor(214, 39, 40);
const SOFT: RGBColor = RGBColor(230, 160, 0);
const OTHER: RGBColor = RGBColor(175, 175, 175);
/// Allocation and switch markers are labelled up to this many.
const MAX_LABELLED_MARKERS: usize = 12;

/// Write `timeline.png` and `timeline.svg` into `dir`; returns their paths.
pub fn write_timeline_plots(tl: &Timeline, dir: &Path, title: &str) -> anyhow::Result<Vec<PathBuf>> {
    let png = dir.join("timeline.png");
    let svg = dir.join("timeline.svg");
    let size = (1400, 760);
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw_timeline(&root, tl, title)?;
        root.present()?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw_timeline(&root, tl, title)?;
        root.present()?;
    }
    Ok(vec![png, svg])
}

/// A colour per host: serving hosts first (in order of first service), then the far
/// ends of scheduled links.
fn host_colours(tl: &Timeline) -> BTreeMap<String, RGBColor> {
    let mut hosts = tl.serving_hosts();
    for (a, b) in tl.links.keys() {
        for h in [a, b] {
            if !hosts.contains(h) && !is_client(tl, h) {
                hosts.push(h.clone());
            }
        }
    }
    hosts.into_iter().enumerate().map(|(i, h)| (h, PALETTE[i % PALETTE.len()])).collect()
}

fn is_client(tl: &Timeline, host: &str) -> bool {
    tl.rows.iter().any(|r| matches!(r, Row::Request { client, .. } if client == host))
}

/// The figure: latency of every request over time (top), link RTTs (bottom).
pub fn draw_timeline<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    tl: &Timeline,
    title: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 26))?;
    let (top, bottom) = if tl.links.is_empty() {
        (root.clone(), None)
    } else {
        let (t, b) = root.split_vertically((62).percent());
        (t, Some(b))
    };
    let colours = host_colours(tl);
    let x_max = tl.duration_ms / 1000.0;
    let (soft, hard) = tl.limits.values().next().copied().unwrap_or((0.0, 0.0));

    // --- top: request latency --------------------------------------------------
    let mut ok: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut failed = Vec::new();
    for r in &tl.rows {
        if let Row::Request { t_ms, outcome, host, latency_ms, .. } = r {
            match (*outcome, host, latency_ms) {
                ("ok", Some(h), Some(l)) => ok.entry(h.clone()).or_default().push((t_ms / 1000.0, *l)),
                ("ok", None, Some(l)) => ok.entry("?".into()).or_default().push((t_ms / 1000.0, *l)),
                ("in_flight", ..) => {}
                _ => failed.push(t_ms / 1000.0),
            }
        }
    }
    let lat: Vec<f64> = ok.values().flatten().map(|p| p.1).collect();
    let lo = lat.iter().copied().fold(f64::INFINITY, f64::min).min(soft.max(0.1)).max(0.05);
    let hi = lat.iter().copied().fold(0.0f64, f64::max).max(hard).max(1.0);
    let (y_lo, y_hi) = (lo / 1.6, hi * 1.8);
    let mut chart = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(if bottom.is_some() { 12 } else { 45 })
        .y_label_area_size(75)
        .build_cartesian_2d(0.0..x_max, (y_lo..y_hi).log_scale())?;
    let mut mesh = chart.configure_mesh();
    mesh.y_desc("request latency, ms (log)").label_style(("sans-serif", 15)).light_line_style(WHITE.mix(0.0));
    if bottom.is_some() {
        mesh.x_labels(0);
    } else {
        mesh.x_desc("simulated time, s");
    }
    mesh.draw()?;
    shade_faults(&mut chart, tl, (y_lo, y_hi))?;
    // Where a client moved to another instance (a switch) or was handed a new one;
    // labelled while there are few enough to read.
    let markers = tl.rows.iter().filter(|r| matches!(r, Row::Switched { .. } | Row::Allocated { .. })).count();
    for r in &tl.rows {
        // Labels of the two kinds at different heights: a switch often follows an allocation.
        let (t_ms, what, to, at_y) = match r {
            Row::Switched { t_ms, to, .. } => (*t_ms, "switch", to, y_lo * 1.5),
            Row::Allocated { t_ms, instance, .. } => (*t_ms, "allocated", instance, y_lo * 1.15),
            _ => continue,
        };
        let x = t_ms / 1000.0;
        let c = colours.get(physarum_net_sim::timeline::host_of(to)).copied().unwrap_or(OTHER);
        let line = DashedLineSeries::new(vec![(x, y_lo), (x, y_hi)], 4, 4, c.mix(0.7).stroke_width(1));
        chart.draw_series(line)?;
        let label = format!("{what} → {}", physarum_net_sim::timeline::host_of(to));
        let style = ("sans-serif", 13).into_font().color(&c);
        if markers <= MAX_LABELLED_MARKERS {
            chart.draw_series(std::iter::once(Text::new(label, (x, at_y), style)))?;
        }
    }
    // With more hosts than colours, the busiest keep theirs and the rest are grey.
    let mut by_count: Vec<(&String, &Vec<(f64, f64)>)> = ok.iter().collect();
    by_count.sort_by_key(|(host, pts)| (std::cmp::Reverse(pts.len()), (*host).clone()));
    let crowded = by_count.len() > PALETTE.len();
    let (named, others) = by_count.split_at(if crowded { PALETTE.len() - 1 } else { by_count.len() });
    if !others.is_empty() {
        let n: usize = others.iter().map(|(_, pts)| pts.len()).sum();
        chart
            .draw_series(others.iter().flat_map(|(_, pts)| pts.iter()).map(|p| Circle::new(*p, 3, OTHER.filled())))?
            .label(format!("{} other hosts ({n} requests)", others.len()))
            .legend(|(x, y)| Circle::new((x + 8, y), 5, OTHER.filled()));
    }
    for (rank, (host, pts)) in named.iter().enumerate() {
        let c = if crowded { PALETTE[rank] } else { colours.get(*host).copied().unwrap_or(OTHER) };
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))?
            .label(format!("served by {host} ({} requests)", pts.len()))
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
    }
    if !failed.is_empty() {
        let y = y_hi / 1.25;
        chart
            .draw_series(failed.iter().map(|t| Cross::new((*t, y), 5, FAILED.stroke_width(2))))?
            .label(format!("failed / timed out ({})", failed.len()))
            .legend(|(x, y)| Cross::new((x + 8, y), 5, FAILED.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;

    // --- bottom: the scheduled links' RTT ---------------------------------------
    if let Some(bottom) = bottom {
        let r_max = tl.links.values().flatten().map(|p| p.1).fold(soft, f64::max) * 1.45;
        let mut chart = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(75)
            .build_cartesian_2d(0.0..x_max, 0.0..r_max.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("simulated time, s")
            .y_desc("link RTT, ms")
            .label_style(("sans-serif", 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        shade_faults(&mut chart, tl, (0.0, r_max))?;
        limit_lines(&mut chart, x_max, soft, hard, r_max)?;
        for ((a, b), steps) in &tl.links {
            let far = if is_client(tl, a) { b } else { a };
            let c = colours.get(far).copied().unwrap_or(OTHER);
            let mut pts = Vec::new();
            for (i, (t, r)) in steps.iter().enumerate() {
                if i > 0 {
                    pts.push((t / 1000.0, steps[i - 1].1));
                }
                pts.push((t / 1000.0, *r));
            }
            pts.push((x_max, steps.last().map_or(0.0, |s| s.1)));
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(3)))?
                .label(format!("{a} ↔ {b}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    Ok(())
}

type Chart<'a, DB, Y> = ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>;

/// Shade every fault span, labelled at its top left.
fn shade_faults<DB: DrawingBackend, Y>(
    chart: &mut Chart<'_, DB, Y>,
    tl: &Timeline,
    (lo, hi): (f64, f64),
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    let shade = RGBColor(255, 90, 90).mix(0.13);
    // Labels of overlapping spans go one under the other.
    let mut rows_end: Vec<f64> = Vec::new();
    for s in &tl.spans {
        let (x0, x1) = (s.from_ms / 1000.0, s.to_ms / 1000.0);
        chart.draw_series(std::iter::once(Rectangle::new([(x0, lo), (x1, hi)], shade.filled())))?;
        let row = rows_end.iter().position(|end| *end <= x0).unwrap_or(rows_end.len());
        if row == rows_end.len() {
            rows_end.push(0.0);
        }
        rows_end[row] = x1.max(x0 + tl.duration_ms / 1000.0 * 0.12);
        let style = ("sans-serif", 13).into_font().color(&FAILED.mix(0.8));
        let label = EmptyElement::at((x0, hi)) + Text::new(s.label.clone(), (3, 2 + 15 * row as i32), style);
        chart.draw_series(std::iter::once(label))?;
    }
    Ok(())
}

/// Dashed soft and hard limits across the chart.
fn limit_lines<DB: DrawingBackend, Y>(
    chart: &mut Chart<'_, DB, Y>,
    x_max: f64,
    soft: f64,
    hard: f64,
    y_max: f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    if hard <= 0.0 {
        return Ok(());
    }
    for (v, c, name) in [(soft, SOFT, "soft"), (hard, FAILED, "hard")] {
        if v > y_max {
            continue;
        }
        let dashes = DashedLineSeries::new(vec![(0.0, v), (x_max, v)], 8, 6, c.mix(0.8).stroke_width(2));
        chart.draw_series(dashes)?;
        let style = ("sans-serif", 13).into_font().color(&c);
        chart.draw_series(std::iter::once(Text::new(format!("{name} {v} ms"), (x_max * 0.005, v), style)))?;
    }
    Ok(())
}

/// The distribution of `values` (ms) as a CDF, with vertical markers (value, label)
/// such as this run's median and a published figure.
pub fn cdf_png(
    values: &[f64],
    markers: &[(f64, String)],
    path: &Path,
    title: &str,
    x_desc: &str,
) -> anyhow::Result<()> {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let x_max = v.iter().copied().chain(markers.iter().map(|m| m.0)).fold(1.0f64, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("share of runs")
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let n = v.len().max(1) as f64;
    let mut steps = vec![(0.0, 0.0)];
    for (i, x) in v.iter().enumerate() {
        steps.push((*x, i as f64 / n));
        steps.push((*x, (i + 1) as f64 / n));
    }
    steps.push((x_max, 1.0));
    let blue = PALETTE[0];
    chart
        .draw_series(LineSeries::new(steps, blue.stroke_width(3)))?
        .label(format!("{} simulated runs", v.len()))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], blue.stroke_width(3)));
    for (i, (x, label)) in markers.iter().enumerate() {
        let c = [FAILED, SOFT, PALETTE[2]][i % 3];
        chart
            .draw_series(DashedLineSeries::new(vec![(*x, 0.0), (*x, 1.05)], 8, 6, c.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present()?;
    Ok(())
}

/// The chart's legend box, at `position`.
fn legend<'a, DB: DrawingBackend + 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}
