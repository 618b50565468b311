//! What the tests share.

use std::path::{Path, PathBuf};

/// A recorded RouteLLM file in `../shared` beside the checkout, or None (said on stderr) when it
/// is absent: the tests that need it skip.
pub fn shared(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/routellm")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} is absent (the recorded RouteLLM answers live in ../shared beside the checkout)",
            p.display()
        );
        None
    }
}

/// The learned router on both feedback modes, RouteLLM's operating point (30%, exploration 10%),
/// 11 shares on the curve; the rest default. Tests change what they measure.
#[allow(dead_code)]
pub fn router_eval(seed: u64, limit: Option<usize>) -> tandem_eval::EvalConfig {
    use tandem_core::policy::FeedbackMode;
    use tandem_eval::runner::PolicyKind;
    tandem_eval::EvalConfig {
        seed,
        target_share: 0.3,
        explore: 0.1,
        grid: 11,
        window: 1000,
        budget: tandem_core::BudgetLimits::default(),
        threads: 2,
        limit,
        policies: [FeedbackMode::Full, FeedbackMode::Partial]
            .into_iter()
            .map(|feedback| tandem_eval::PolicySpec {
                kind: PolicyKind::Router,
                feedback,
            })
            .collect(),
        router: tandem_core::policy::router::RouterConfig::default(),
        cascade: tandem_core::policy::cascade::CascadeConfig::default(),
        prior: None,
        cost_weight: 0.0,
        embedder: None,
    }
}

/// MMLU's two models at RouteLLM's prices (Mixtral $0.24, GPT-4 $24.7 per million tokens).
#[allow(dead_code)]
pub fn mmlu_models(data: std::sync::Arc<tandem_eval::Dataset>) -> tandem_eval::runner::Models {
    let model = |m: &str| data.models.iter().position(|x| x == m).unwrap();
    tandem_eval::runner::Models {
        weak: model("mixtral-8x7b-instruct"),
        strong: model("gpt-4-1106-preview"),
        weak_price: tandem_core::Price::parse("token:0.24").unwrap(),
        strong_price: tandem_core::Price::parse("token:24.7").unwrap(),
        default_output_tokens: 1,
        data,
    }
}
