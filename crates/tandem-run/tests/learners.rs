//! The cheap tiers learn a real stream: progressive accuracy on movie-review snippets with gold
//! labels, above floors measured with margin (hashed ~69%, MiniLM head ~75% on the last third of
//! 1,500 items). Needs the installed assets; skips without them unless TANDEM_REQUIRE_ASSETS=1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tandem_core::features::TextFeatures;
use tandem_models::assets::{find, Store};
use tandem_models::classifier::{Classifier, HashedClassifier, MiniLmHead};
use tandem_models::minilm::MiniLm;
use tandem_run::RunConfig;

fn items() -> Option<Vec<(String, usize)>> {
    let store = Store::default_home();
    if !["snippets", "minilm"]
        .iter()
        .all(|id| store.is_installed(find(id).unwrap()))
    {
        assert!(
            std::env::var("TANDEM_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "assets missing"
        );
        eprintln!("skipping: assets not installed (scripts/setup)");
        return None;
    }
    let cfg = RunConfig::parse(
        std::path::Path::new("demo.toml"),
        include_str!("../../../examples/demo.toml"),
    )
    .unwrap();
    let s = tandem_run::stream::open("snippets", &cfg, 0, &store).unwrap();
    Some(
        s.items
            .into_iter()
            .take(1500)
            .map(|i| (i.text, i.gold.unwrap()))
            .collect(),
    )
}

fn last_third_accuracy(c: &mut dyn Classifier, items: &[(String, usize)]) -> f64 {
    let mut ok = 0;
    for (i, (t, y)) in items.iter().enumerate() {
        let p = c.predict(t).unwrap();
        if i >= items.len() * 2 / 3 && p.label() == *y {
            ok += 1;
        }
        c.learn(t, *y, 1.0).unwrap();
    }
    ok as f64 / (items.len() / 3) as f64
}

#[test]
fn hashed_learner_learns_sentiment_online() {
    let Some(items) = items() else { return };
    let mut h = HashedClassifier::new(
        2,
        20,
        TextFeatures {
            word_ngrams: 2,
            char_min: 3,
            char_max: 5,
        },
        0.2,
    )
    .unwrap();
    let acc = last_third_accuracy(&mut h, &items);
    assert!(acc >= 0.63, "hashed accuracy {acc}");
}

#[test]
fn minilm_head_learns_sentiment_online() {
    let Some(items) = items() else { return };
    let dir = Store::default_home()
        .path("minilm", "config.json")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let mut m = MiniLmHead::new(MiniLm::load(&dir, 128).unwrap(), 2, 0.05, 32).unwrap();
    let texts: Vec<&str> = items.iter().map(|(t, _)| t.as_str()).collect();
    m.prepare(&texts).unwrap();
    let acc = last_third_accuracy(&mut m, &items);
    assert!(acc >= 0.69, "minilm head accuracy {acc}");
}
