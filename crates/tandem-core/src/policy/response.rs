//! Signals in a generated answer that say whether to trust it, without knowing the truth: whether a
//! final number can be extracted, whether the arithmetic it shows is right, hedging and
//! self-correction, truncation and length. Used by cascade policies on math and QA answers.

/// What was read off one response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseSignals {
    pub chars: usize,
    /// A final-answer marker ("####" or "answer is") is present.
    pub has_final_marker: bool,
    pub final_answer: Option<f64>,
    /// The response ends with a number (a complete final line) rather than mid-sentence.
    pub ends_with_number: bool,
    /// Equations shown ("12 * 3 = 36", "<<12*3=36>>") and how many of them are wrong.
    pub equations: u32,
    pub wrong_equations: u32,
    pub hedges: u32,
    pub corrections: u32,
    /// The final answer is one of the numbers of the prompt (often a copied, unsolved quantity).
    pub final_in_prompt: bool,
}

const HEDGES: &[&str] = &[
    "assume",
    "approximately",
    "cannot",
    "can't",
    "not possible",
    "unclear",
    "not enough information",
    "round",
    "about",
    "estimate",
    "impossible",
    "doesn't make sense",
    "does not make sense",
];
const CORRECTIONS: &[&str] = &[
    "however",
    "but wait",
    "wait",
    "actually",
    "mistake",
    "correction",
    "recalculate",
    "incorrect",
    "let me re",
    "re-evaluate",
    "instead",
    "oops",
    "sorry",
    "error",
];

pub fn analyze(prompt: &str, response: &str) -> ResponseSignals {
    let lower = response.to_lowercase();
    let numbers = numbers_in(response);
    let marker_pos = lower
        .rfind("####")
        .map(|p| p + 4)
        .or_else(|| lower.rfind("answer is").map(|p| p + 9));
    let final_answer = match marker_pos {
        Some(p) => numbers_in(response.get(p..).unwrap_or("")).first().copied(),
        None => numbers.last().copied(),
    };
    let trimmed = response
        .trim_end()
        .trim_end_matches(['.', '!', '*', '$', ')']);
    let ends_with_number = trimmed.chars().last().is_some_and(|c| c.is_ascii_digit());
    let (equations, wrong_equations) = check_equations(response);
    let prompt_numbers = numbers_in(prompt);
    let final_in_prompt =
        final_answer.is_some_and(|a| prompt_numbers.iter().any(|&p| (p - a).abs() < 1e-9));
    ResponseSignals {
        chars: response.chars().count(),
        has_final_marker: marker_pos.is_some(),
        final_answer,
        ends_with_number,
        equations,
        wrong_equations,
        hedges: count_any(&lower, HEDGES),
        corrections: count_any(&lower, CORRECTIONS),
        final_in_prompt,
    }
}

fn count_any(text: &str, words: &[&str]) -> u32 {
    words.iter().map(|w| text.matches(w).count() as u32).sum()
}

/// Numbers written in the text: optional sign, thousands commas, decimals.
pub fn numbers_in(text: &str) -> Vec<f64> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let neg = i > 0 && b[i - 1] == b'-' && (i < 2 || !b[i - 2].is_ascii_alphanumeric());
            let mut s = String::new();
            while i < b.len() {
                let c = b[i];
                if c.is_ascii_digit() {
                    s.push(c as char);
                } else if c == b',' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    // thousands separator: skip
                } else if c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    s.push('.');
                } else {
                    break;
                }
                i += 1;
            }
            if let Ok(v) = s.parse::<f64>() {
                out.push(if neg { -v } else { v });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Finds "lhs = number" where lhs is arithmetic, evaluates lhs and counts mismatches.
fn check_equations(text: &str) -> (u32, u32) {
    let b = text.as_bytes();
    let (mut total, mut wrong) = (0, 0);
    for (eq, _) in text.match_indices('=') {
        // Left side: walk back over arithmetic characters.
        let mut start = eq;
        while start > 0 && is_arith(b[start - 1]) {
            start -= 1;
        }
        let lhs = text.get(start..eq).unwrap_or("");
        if !lhs
            .bytes()
            .any(|c| matches!(c, b'+' | b'*' | b'/' | b'x' | b'-'))
        {
            continue;
        }
        let rhs_text = text.get(eq + 1..).unwrap_or("");
        let rhs_span = rhs_text
            .trim_start_matches([' ', '$'])
            .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ',' || c == '-'))
            .next()
            .unwrap_or("");
        let Some(&rhs) = numbers_in(rhs_span).first() else {
            continue;
        };
        let Some(lhs_val) = eval(lhs) else { continue };
        total += 1;
        if (lhs_val - rhs).abs() > 1e-2 * rhs.abs().max(1.0) {
            wrong += 1;
        }
    }
    (total, wrong)
}

fn is_arith(c: u8) -> bool {
    c.is_ascii_digit()
        || matches!(
            c,
            b'+' | b'-' | b'*' | b'/' | b'x' | b'(' | b')' | b'.' | b',' | b' ' | b'$' | b'<'
        )
}

/// Evaluates + − × ÷ and parentheses over decimal numbers; None for anything else.
pub fn eval(expr: &str) -> Option<f64> {
    let cleaned: Vec<u8> = expr
        .bytes()
        .filter(|c| !matches!(c, b' ' | b'$' | b',' | b'<'))
        .map(|c| if c == b'x' { b'*' } else { c })
        .collect();
    let mut p = Parser { s: &cleaned, i: 0 };
    let v = p.sum()?;
    (p.i == cleaned.len() && v.is_finite()).then_some(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn sum(&mut self) -> Option<f64> {
        let mut v = self.product()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            let r = self.product()?;
            v = if op == b'+' { v + r } else { v - r };
        }
        Some(v)
    }

    fn product(&mut self) -> Option<f64> {
        let mut v = self.atom()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.i += 1;
            let r = self.atom()?;
            v = if op == b'*' { v * r } else { v / r };
        }
        Some(v)
    }

    fn atom(&mut self) -> Option<f64> {
        match self.peek()? {
            b'(' => {
                self.i += 1;
                let v = self.sum()?;
                (self.peek() == Some(b')')).then(|| self.i += 1)?;
                Some(v)
            }
            b'-' => {
                self.i += 1;
                Some(-self.atom()?)
            }
            _ => {
                let start = self.i;
                while self.peek().is_some_and(|c| c.is_ascii_digit() || c == b'.') {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()?
                    .parse()
                    .ok()
            }
        }
    }
}

/// How far two generated answers say the same thing, in [0, 1]: when both end in a final number,
/// whether the numbers match (the answer, not the wording, is what counts); otherwise the F1 of
/// their lower-cased word multisets. Used to learn from a cascade's escalations, where the large
/// model's answer stands in for the truth.
pub fn agreement(a: &str, b: &str) -> f32 {
    let (sa, sb) = (analyze("", a), analyze("", b));
    if let (Some(x), Some(y)) = (sa.final_answer, sb.final_answer) {
        if sa.has_final_marker
            || sb.has_final_marker
            || (sa.ends_with_number && sb.ends_with_number)
        {
            return if (x - y).abs() <= 1e-6 * x.abs().max(1.0) {
                1.0
            } else {
                0.0
            };
        }
    }
    let words = |t: &str| -> Vec<String> {
        let mut w: Vec<String> = t
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        w.sort_unstable();
        w
    };
    let (wa, wb) = (words(a), words(b));
    if wa.is_empty() || wb.is_empty() {
        return if wa.is_empty() && wb.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    // Multiset intersection of two sorted lists.
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < wa.len() && j < wb.len() {
        match wa[i].cmp(&wb[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    (2 * common) as f32 / (wa.len() + wb.len()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        assert_eq!(eval("2 + 3 * 4"), Some(14.0));
        assert_eq!(eval("(2+3)*4"), Some(20.0));
        assert_eq!(eval("$1,200 / 4"), Some(300.0));
        assert_eq!(eval("3 x 5"), Some(15.0));
        assert_eq!(eval("2 +"), None);
        assert_eq!(eval("two"), None);
    }

    #[test]
    fn signals_of_a_good_and_a_bad_answer() {
        let prompt = "Janet has 16 eggs and eats 3. How many are left?";
        let good = analyze(prompt, "She has 16 - 3 = 13 eggs left.\n#### 13");
        assert!(good.has_final_marker && good.ends_with_number);
        assert_eq!(good.final_answer, Some(13.0));
        assert_eq!((good.equations, good.wrong_equations), (1, 0));
        assert!(!good.final_in_prompt);
        let bad = analyze(
            prompt,
            "Actually, 16 - 3 = 12, however I assume she has 16 eggs",
        );
        assert_eq!((bad.equations, bad.wrong_equations), (1, 1));
        assert!(bad.corrections >= 2 && bad.hedges >= 1);
        assert!(
            bad.final_in_prompt,
            "last number 16 is copied from the prompt"
        );
        assert!(!bad.ends_with_number || bad.final_answer == Some(16.0));
        let cut = analyze(
            prompt,
            "The value is 80,000 + 50,000 = $<<80000+50000=130000>>130,00",
        );
        assert_eq!(cut.final_answer, Some(13000.0));
        assert!(cut.equations >= 1 && cut.wrong_equations == 0);
    }

    #[test]
    fn numbers() {
        assert_eq!(
            numbers_in("costs $1,200.50 or -3, x-2"),
            vec![1200.5, -3.0, 2.0]
        );
    }

    #[test]
    fn agreement_of_answers() {
        assert_eq!(agreement("so 3 * 4 = 12\n#### 12", "The answer is 12"), 1.0);
        assert_eq!(agreement("#### 12", "#### 13"), 0.0);
        assert!((agreement("Paris is the capital", "the capital is Paris") - 1.0).abs() < 1e-6);
        assert!(agreement("Paris", "Lyon, France") < 0.01);
        assert_eq!(agreement("", ""), 1.0);
    }
}
