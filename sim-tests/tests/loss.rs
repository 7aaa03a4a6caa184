//! Message loss is faithful and one lost message is no outage: on the paper's
//! mobile-edge run with 1 % loss on every mobile link (`scenarios/mobile-edge-lossy.json`)
//! datagrams are lost and stream segments retransmitted, and at least 99 % of the
//! requests succeed.

use physarum_net_sim::Scenario;
use sim_tests::run_seeds;

#[test]
fn mobile_edge_with_one_percent_loss_on_every_mobile_link_succeeds_99_percent() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/mobile-edge-lossy.json");
    let text = std::fs::read_to_string(path).expect("the scenario file");
    let s = Scenario::from_json(&text).expect("a valid scenario");
    let lossy = s
        .schedule
        .iter()
        .filter(|x| matches!(&x.fault, physarum_net_sim::Fault::Loss { rate, .. } if *rate == 0.01))
        .count();
    assert_eq!(lossy, 3, "1 % loss on the three mobile links");
    run_seeds("mobile_edge_with_one_percent_loss_on_every_mobile_link_succeeds_99_percent", &s, 2, |r| {
        let f = &r.figures;
        assert!(f.sent >= 200, "{}", r.figures_text());
        assert!(f.ok * 100 >= f.sent * 99, "{}", r.figures_text());
        assert_eq!(f.timed_out, 0, "{}", r.figures_text());
        println!("seed {}: {}", r.seed, r.figures_text());
    });
}
