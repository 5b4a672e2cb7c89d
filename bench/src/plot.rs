//! docs/benchmarks-latency.png: latency percentiles at fixed rates, in-process against sidecar;
//! docs/benchmarks-dapr.png: the same beside daprd's state stores (the dapr part).

use crate::Target;
use crate::load::Kind;
use crate::report::{PCTS, Phase, Report, rates_of};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;

const FONT_FILES: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the font once per process (the dapr plot follows the latency one).
fn register_font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONT_FILES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or("no DejaVuSans.ttf for the plot's text (apt-get install fonts-dejavu-core)")?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "DejaVuSans.ttf is not a usable font".to_string())
    })
    .clone()
}

fn color(target: Target, rate_rank: usize) -> RGBColor {
    let dark = rate_rank > 0;
    match (target, dark) {
        (Target::Generator, _) => RGBColor(160, 160, 160),
        (Target::HttpHop, false) => RGBColor(200, 170, 90),
        (Target::HttpHop, true) => RGBColor(140, 100, 0),
        (Target::RedisGet, false) => RGBColor(120, 200, 120),
        (Target::RedisGet, true) => RGBColor(20, 120, 20),
        (Target::InProcess, false) => RGBColor(110, 160, 230),
        (Target::InProcess, true) => RGBColor(10, 60, 160),
        (Target::Sidecar, false) => RGBColor(240, 130, 110),
        (Target::Sidecar, true) => RGBColor(170, 20, 20),
        (Target::SidecarTls, false) => RGBColor(230, 130, 200),
        (Target::SidecarTls, true) => RGBColor(150, 20, 110),
        (Target::DaprRedis, false) => RGBColor(170, 150, 230),
        (Target::DaprRedis, true) => RGBColor(80, 50, 160),
        (Target::DaprPostgres, false) => RGBColor(150, 210, 210),
        (Target::DaprPostgres, true) => RGBColor(20, 110, 110),
    }
}

pub fn latency_png(report: &Report, path: &Path) -> Result<(), String> {
    let title = format!(
        "wtc sidecar vs in-process: latency at fixed rates ({} CPUs, {})",
        report.machine.nproc, report.machine.date
    );
    let panels: Vec<Panel> = [Kind::Hit, Kind::Miss, Kind::Write]
        .into_iter()
        .map(|kind| {
            let caption = format!("{} (µs, log scale)", kind.name());
            fixed_rates(&report.phases, kind, caption, |p| {
                p.target != Target::Generator
            })
        })
        .collect();
    draw(path, &title, &panels)
}

/// docs/benchmarks-dapr.png: the dapr part's latency percentiles, reads and writes at fixed
/// rates and at saturation, for the in-process library, the wtc sidecar and daprd's two stores.
pub fn dapr_png(report: &Report, path: &Path) -> Result<(), String> {
    if report.dapr.is_empty() {
        return Err("plot: the dapr part did not run (--daprd PATH or WTC_DAPRD)".into());
    }
    let title = format!(
        "wtc sidecar vs daprd's state stores: latency ({} CPUs, {})",
        report.machine.nproc, report.machine.date
    );
    let fixed = |kind: Kind, what: &str| {
        let caption = format!("{what} at fixed rates (µs, log scale)");
        fixed_rates(&report.dapr, kind, caption, |_| true)
    };
    let saturated = Panel {
        caption: "at saturation, 16 connections (µs, log scale)".into(),
        lines: report
            .dapr
            .iter()
            .filter(|p| p.rate.is_none())
            .map(|p| Line {
                label: format!(
                    "{} {}s {:.0}/s",
                    p.target.name(),
                    if p.kind == Kind::Write {
                        "write"
                    } else {
                        "read"
                    },
                    p.throughput
                ),
                color: color(p.target, usize::from(p.kind == Kind::Write)),
                pcts_us: p.pcts_us,
            })
            .collect(),
    };
    draw(
        path,
        &title,
        &[
            fixed(Kind::Hit, "reads"),
            fixed(Kind::Write, "writes"),
            saturated,
        ],
    )
}

/// A panel of the fixed-rate phases of one kind (those `keep` keeps), a line per phase, shaded
/// by rate.
fn fixed_rates(
    phases: &[Phase],
    kind: Kind,
    caption: String,
    keep: impl Fn(&Phase) -> bool,
) -> Panel {
    let rates = rates_of(phases, kind);
    Panel {
        caption,
        lines: phases
            .iter()
            .filter(|p| p.kind == kind && p.rate.is_some() && keep(p))
            .map(|p| Line {
                label: format!("{} {:.0}/s", p.target.name(), p.rate.unwrap_or_default()),
                color: color(p.target, rank(&rates, p.rate)),
                pcts_us: p.pcts_us,
            })
            .collect(),
    }
}

/// Where a phase's rate falls among the rates of its kind: the shade of its line.
fn rank(rates: &[f64], rate: Option<f64>) -> usize {
    rates.iter().position(|r| Some(*r) == rate).unwrap_or(0)
}

/// One chart: a line of percentiles per phase.
struct Panel {
    caption: String,
    lines: Vec<Line>,
}

struct Line {
    label: String,
    color: RGBColor,
    pcts_us: [f64; 4],
}

fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    register_font()?;
    let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
    let root = BitMapBackend::new(path, (1500, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, panel) in areas.iter().zip(panels) {
        let (lo, hi) = panel
            .lines
            .iter()
            .flat_map(|l| l.pcts_us)
            .filter(|v| *v > 0.0)
            .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if panel.lines.is_empty() || hi <= 0.0 {
            continue;
        }
        let (lo, hi) = (lo * 0.7, hi * 1.5);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2f64..3.2f64, (lo..hi).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_labels(4)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && (0.0..4.0).contains(&i) {
                    PCTS[i as usize].1.to_string()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
        for line in &panel.lines {
            let c = line.color;
            let pts: Vec<(f64, f64)> = line
                .pcts_us
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, v.max(lo)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(line.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                });
            chart
                .draw_series(pts.into_iter().map(|xy| Circle::new(xy, 3, c.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
