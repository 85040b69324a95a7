//! Draws the curves that `cluster-scripts/scale-vs-etcd.sh` measures, from
//! the JSON lines it writes (`SCALE_JSON`), as PNG plots: etcd 3.4 and kvd
//! on the same axes, one panel per figure.
//!
//! ```sh
//! kvd-scale-plot results.jsonl docs/plots
//! ```
//!
//! Text is drawn with a TrueType font read from the file `KVD_PLOT_FONT`
//! names (default: Debian's DejaVu Sans, package `fonts-dejavu-core`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SYSTEMS: [(&str, RGBColor); 2] = [("etcd", RGBColor(0x1f, 0x77, 0xb4)), ("kvd", RGBColor(0xd6, 0x27, 0x28))];

/// A figure to plot: its title and how to read it from a result line.
struct Figure {
    title: &'static str,
    value: fn(&Value) -> Option<f64>,
}

/// One PNG: a row of panels, one per figure, over the points of `x` in the
/// result lines that have it.
struct Plot {
    file: &'static str,
    x: &'static str,
    x_label: &'static str,
    log_x: bool,
    figures: Vec<Figure>,
}

fn mb(kb: Option<f64>) -> Option<f64> {
    kb.map(|kb| kb / 1024.0)
}

fn max_of(v: &Value) -> Option<f64> {
    v.as_array()?.iter().filter_map(Value::as_f64).reduce(f64::max)
}

fn plots() -> Vec<Plot> {
    vec![
        Plot {
            file: "keys.png",
            x: "keys",
            x_label: "keys of 1 KiB",
            log_x: true,
            figures: vec![
                Figure { title: "puts/s while loading", value: |r| r["load"]["throughput"].as_f64() },
                Figure { title: "linearizable range p99 (ms)", value: |r| r["range"]["latency_ms"]["p99"].as_f64() },
                Figure { title: "resident memory, largest member (MB)", value: |r| mb(max_of(&r["rss_kb"])) },
                Figure { title: "data directory, largest member (MB)", value: |r| mb(max_of(&r["disk_kb"])) },
                Figure { title: "restart to healthy (ms)", value: |r| r["restart_ms"].as_f64() },
                Figure { title: "member that lost its data: ms to serving", value: |r| r["catchup_ms"].as_f64() },
                Figure { title: "its peak resident memory (MB)", value: |r| mb(r["catchup_peak_kb"].as_f64()) },
                Figure {
                    title: "data dir after delete 90%, compact, defrag (MB)",
                    value: |r| mb(max_of(&r["defrag_kb"])),
                },
            ],
        },
        Plot {
            file: "writers.png",
            x: "writers",
            x_label: "put clients",
            log_x: true,
            figures: vec![
                Figure { title: "puts/s", value: |r| r["put"]["throughput"].as_f64() },
                Figure { title: "put p50 (ms)", value: |r| r["put"]["latency_ms"]["p50"].as_f64() },
                Figure { title: "put p99 (ms)", value: |r| r["put"]["latency_ms"]["p99"].as_f64() },
            ],
        },
        Plot {
            file: "leases.png",
            x: "leases",
            x_label: "leases kept alive",
            log_x: true,
            figures: vec![
                Figure { title: "keep-alives answered/s", value: |r| r["keepalive"]["answered_per_s"].as_f64() },
                Figure { title: "keep-alive p99 (ms)", value: |r| r["keepalive"]["latency_ms"]["p99"].as_f64() },
                Figure { title: "members' CPU (cores)", value: |r| r["cpu_cores"].as_f64() },
                Figure { title: "resident memory, largest member (MB)", value: |r| mb(r["rss_kb"].as_f64()) },
            ],
        },
        Plot {
            file: "watchers.png",
            x: "watchers",
            x_label: "watchers of one prefix",
            log_x: true,
            figures: vec![
                Figure { title: "put to event p50 (ms)", value: |r| r["watch"]["latency_ms"]["p50"].as_f64() },
                Figure { title: "put to event p99 (ms)", value: |r| r["watch"]["latency_ms"]["p99"].as_f64() },
                Figure { title: "resident memory, largest member (MB)", value: |r| mb(r["rss_kb"].as_f64()) },
            ],
        },
        Plot {
            file: "bigdata.png",
            x: "big_mib",
            x_label: "MiB of values written, members limited in memory",
            log_x: false,
            figures: vec![
                Figure {
                    title: "MiB/s written",
                    value: |r| Some(r["load"]["throughput"].as_f64()? * r["val_size"].as_f64()? / 1048576.0),
                },
                Figure { title: "linearizable range p99 (ms)", value: |r| r["range"]["latency_ms"]["p99"].as_f64() },
                Figure { title: "peak resident memory, largest member (MB)", value: |r| mb(max_of(&r["hwm_kb"])) },
                Figure { title: "data directory, largest member (MB)", value: |r| mb(max_of(&r["disk_kb"])) },
            ],
        },
    ]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [results, out] = args.as_slice() else { bail!("usage: kvd-scale-plot RESULTS.jsonl OUT_DIR") };
    let font_path = std::env::var("KVD_PLOT_FONT").unwrap_or_else(|_| DEFAULT_FONT.to_string());
    let font = std::fs::read(&font_path).with_context(|| {
        format!("reading the font {font_path} (apt-get install fonts-dejavu-core, or set KVD_PLOT_FONT)")
    })?;
    if plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice())).is_err() {
        bail!("{font_path} is not a TrueType font");
    }
    let text = std::fs::read_to_string(results).with_context(|| format!("reading {results}"))?;
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{results} is not JSON lines"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {out}"))?;
    for plot in plots() {
        let path = Path::new(out).join(plot.file);
        if draw(&plot, &rows, &path)? {
            println!("{}", path.display());
        }
    }
    Ok(())
}

/// The points of one system for one figure, ordered by x.
fn points(rows: &[Value], system: &str, x: &str, figure: &Figure) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r["system"] == system)
        .filter_map(|r| Some((r[x].as_f64()?, (figure.value)(r)?)))
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Draws `plot` to `path`; false if no result line has its points.
fn draw(plot: &Plot, rows: &[Value], path: &PathBuf) -> Result<bool> {
    let series: Vec<Vec<Vec<(f64, f64)>>> =
        plot.figures.iter().map(|f| SYSTEMS.iter().map(|(s, _)| points(rows, s, plot.x, f)).collect()).collect();
    if series.iter().flatten().all(Vec::is_empty) {
        return Ok(false);
    }
    let columns = plot.figures.len().min(4);
    let lines = plot.figures.len().div_ceil(columns);
    let size = (420 * columns as u32, 340 * lines as u32);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    for ((area, figure), series) in root.split_evenly((lines, columns)).iter().zip(&plot.figures).zip(&series) {
        panel(area, plot, figure, series).map_err(|e| anyhow::anyhow!("{}: {e}", figure.title))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(true)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn panel(area: &Area<'_>, plot: &Plot, figure: &Figure, series: &[Vec<(f64, f64)>]) -> Result<(), String> {
    let all: Vec<(f64, f64)> = series.iter().flatten().copied().collect();
    if all.is_empty() {
        return Ok(());
    }
    let (x0, x1) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    let y1 = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let y1 = if y1 > 0.0 { y1 } else { 1.0 };
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { (x0 * 0.5, x0 * 2.0) };
    let fail = |e: &dyn std::fmt::Debug| format!("{e:?}");
    // A log axis is drawn as log10 on a linear one, labelled at each power of ten.
    let (series, x0, x1): (Vec<Vec<(f64, f64)>>, f64, f64) = match plot.log_x {
        true => (
            series.iter().map(|s| s.iter().map(|&(x, y)| (x.log10(), y)).collect()).collect(),
            x0.log10().floor() - 0.1,
            x1.log10().ceil() + 0.1,
        ),
        false => (series.to_vec(), 0.0, x1 * 1.05),
    };
    let label = |x: &f64| match plot.log_x {
        true if (x - x.round()).abs() < 1e-6 => human(10f64.powf(x.round())),
        true => String::new(),
        false => human(*x),
    };
    let mut builder = ChartBuilder::on(area);
    builder.caption(figure.title, ("sans-serif", 16)).margin(10).x_label_area_size(36).y_label_area_size(56);
    let mut chart = builder.build_cartesian_2d(x0..x1, 0.0..y1).map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(plot.x_label)
        .x_labels(if plot.log_x { ((x1 - x0).ceil() as usize + 1).max(4) } else { 6 })
        .x_label_formatter(&label)
        .y_label_formatter(&|y| human(*y))
        .disable_x_mesh()
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| fail(&e))?;
    lines(&mut chart, &series)
}

/// 1,500 as "1.5k", 2,000,000 as "2M"; small numbers as they are.
fn human(v: f64) -> String {
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    match v.abs() {
        a if a >= 1e6 => format!("{}M", trim(format!("{:.1}", v / 1e6))),
        a if a >= 1e3 => format!("{}k", trim(format!("{:.1}", v / 1e3))),
        a if a >= 10.0 => format!("{v:.0}"),
        _ => trim(format!("{v:.2}")),
    }
}

/// Draws each system's points of one figure, joined, with a legend.
fn lines<'a, DB>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    series: &[Vec<(f64, f64)>],
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
{
    let fail = |e: &dyn std::fmt::Debug| format!("{e:?}");
    for ((name, color), points) in SYSTEMS.iter().zip(series) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(if *name == "etcd" { "etcd 3.4" } else { "kvd" })
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows() -> Vec<Value> {
        let key = |system: &str, keys: u64, put: f64| json!({"system": system, "keys": keys, "load": {"throughput": put}, "rss_kb": [1024, 4096]});
        vec![key("kvd", 100_000, 5.0), key("etcd", 10_000, 2.0), key("kvd", 10_000, 4.0), json!({"system": "kvd"})]
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(human(1_000_000.0), "1M");
        assert_eq!(human(1_500.0), "1.5k");
        assert_eq!(human(250.0), "250");
        assert_eq!(human(0.5), "0.5");
    }

    #[test]
    fn points_are_one_systems_in_order_of_x_and_skip_lines_without_the_figure() {
        let rows = rows();
        let load = Figure { title: "puts/s", value: |r| r["load"]["throughput"].as_f64() };
        assert_eq!(points(&rows, "kvd", "keys", &load), vec![(10_000.0, 4.0), (100_000.0, 5.0)]);
        assert_eq!(points(&rows, "etcd", "keys", &load), vec![(10_000.0, 2.0)]);
        let rss = Figure { title: "MB", value: |r| mb(max_of(&r["rss_kb"])) };
        assert_eq!(points(&rows, "etcd", "keys", &rss), vec![(10_000.0, 4.0)]);
    }

    #[test]
    fn a_plot_is_a_png_and_one_without_points_is_not_drawn() {
        let font =
            std::fs::read(DEFAULT_FONT).expect("DejaVu Sans (cluster-scripts/test.sh installs fonts-dejavu-core)");
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
            .map_err(|_| "not a font")
            .expect("font");
        let dir = tempfile::tempdir().expect("tempdir");
        let [keys, writers, ..] = &plots()[..] else { panic!("the plots") };
        let path = dir.path().join("keys.png");
        assert!(draw(keys, &rows(), &path).expect("drawn"));
        let png = std::fs::read(&path).expect("written");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000, "{} bytes", png.len());
        let none = dir.path().join("writers.png");
        assert!(!draw(writers, &rows(), &none).expect("nothing to draw"));
        assert!(!none.exists());
    }

    #[test]
    fn the_data_larger_than_memory_plot_reads_mib_per_second_and_peak_memory() {
        let plots = plots();
        let big = plots.iter().find(|p| p.file == "bigdata.png").expect("the bigdata plot");
        let row: Value = serde_json::from_str(
            r#"{"system":"kvd","big_mib":1024,"val_size":16384,"load":{"throughput":128.0},
                "hwm_kb":[1024,4096,2048],"disk_kb":[1,2,3],"range":null}"#,
        )
        .expect("json");
        let at = |title: &str| {
            let figure = big.figures.iter().find(|f| f.title.starts_with(title)).expect("figure");
            points(std::slice::from_ref(&row), "kvd", big.x, figure)
        };
        assert_eq!(at("MiB/s"), vec![(1024.0, 2.0)]);
        assert_eq!(at("peak"), vec![(1024.0, 4.0)]);
        // A step whose range did not run (a member was gone) has no range point.
        assert_eq!(at("linearizable"), vec![]);
    }
}
