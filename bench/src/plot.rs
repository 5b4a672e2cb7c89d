//! docs/benchmarks-latency.png: latency percentiles at fixed rates, in-process against sidecar.

use crate::Target;
use crate::load::Kind;
use crate::report::{PCTS, Report};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;

const FONT_FILES: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<(), String> {
    let bytes = FONT_FILES
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or("no DejaVuSans.ttf for the plot's text (apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| "DejaVuSans.ttf is not a usable font".to_string())
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
    register_font()?;
    let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
    let root = BitMapBackend::new(path, (1500, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "wtc sidecar vs in-process: latency at fixed rates ({} CPUs, {})",
        report.machine.nproc, report.machine.date
    );
    let root = root
        .titled(&title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 3));
    for (panel, kind) in panels.iter().zip([Kind::Hit, Kind::Miss, Kind::Write]) {
        let phases: Vec<_> = report
            .phases
            .iter()
            .filter(|p| p.kind == kind && p.rate.is_some() && p.target != Target::Generator)
            .collect();
        let (lo, hi) = phases
            .iter()
            .flat_map(|p| p.pcts_us)
            .filter(|v| *v > 0.0)
            .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if phases.is_empty() || hi <= 0.0 {
            continue;
        }
        let (lo, hi) = (lo * 0.7, hi * 1.5);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{} (µs, log scale)", kind.name()),
                ("sans-serif", 18),
            )
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
        let rates = report.rates(kind);
        for p in phases {
            let rank = rates.iter().position(|r| Some(*r) == p.rate).unwrap_or(0);
            let c = color(p.target, rank);
            let pts: Vec<(f64, f64)> = p
                .pcts_us
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, v.max(lo)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!(
                    "{} {:.0}/s",
                    p.target.name(),
                    p.rate.unwrap_or_default()
                ))
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
