//! `physarum-sim run --out DIR`: the timeline and its plots are written, and two runs
//! of one seed print the same text (wall time goes to stderr).

use std::path::Path;
use std::process::Command;

fn run(file: &Path, out: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_physarum-sim"))
        .args(["run", file.to_str().unwrap(), "--seed", "3", "--out", out.to_str().unwrap()])
        .output()
        .expect("physarum-sim runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("s wall"), "wall time on stderr");
    String::from_utf8(o.stdout).unwrap().replace(out.to_str().unwrap(), "OUT")
}

#[test]
fn run_out_writes_the_timeline_and_plots_and_prints_the_same_text_twice() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/cold-start.json");
    let dir = std::env::temp_dir().join(format!("physarum-sim-cli-{}", std::process::id()));
    let (a, b) = (dir.join("a"), dir.join("b"));
    let first = run(&file, &a);
    let second = run(&file, &b);
    assert_eq!(first, second);
    assert!(!first.contains("wall"), "{first}");
    for name in ["timeline.jsonl", "requests.csv", "timeline.png", "timeline.svg"] {
        assert!(first.contains(&format!("wrote OUT/{name}")), "{first}");
    }
    let png = std::fs::read(a.join("timeline.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    let svg = std::fs::read_to_string(a.join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("served by alloc1"), "{}", &svg[..200.min(svg.len())]);
    let jsonl = std::fs::read_to_string(a.join("timeline.jsonl")).unwrap();
    assert_eq!(jsonl, std::fs::read_to_string(b.join("timeline.jsonl")).unwrap());
    assert!(jsonl.lines().any(|l| l.contains("\"kind\":\"request\"") && l.contains("\"host\":\"alloc1\"")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn first_response_plots_the_cold_allocation_over_seeds() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/cold-start.json");
    let dir = std::env::temp_dir().join(format!("physarum-sim-first-{}", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_physarum-sim"))
        .args(["first-response", file.to_str().unwrap(), "--seeds", "2", "--reference-ms", "2170", "--out"])
        .arg(&dir)
        .output()
        .expect("physarum-sim runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && stdout.contains("first response over 2 of 2 seeds: median"), "{stdout}");
    let csv = std::fs::read_to_string(dir.join("first-response.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(std::fs::read(dir.join("first-response.png")).unwrap().starts_with(b"\x89PNG"));
    std::fs::remove_dir_all(&dir).unwrap();
}
