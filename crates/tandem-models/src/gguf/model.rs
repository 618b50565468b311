//! A quantized decoder-only transformer read from GGUF (llama and qwen2 architectures), with the
//! KV cache as an explicit value: a prompt is run once, and its cache is reused for every
//! candidate continuation (label scoring, action scoring) without recomputing the prompt.

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_transformers::quantized_nn::RmsNorm;
use std::fs::File;
use std::path::Path;

use super::GgufError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    fn prefix(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// A weight kept quantized for one-token steps (memory-bound: fewer bytes win) and, when asked,
/// also dequantized to f32 for multi-token passes (compute-bound: candle's f32 GEMM is 4–6x faster
/// here than its quantized kernels, which work one row at a time).
struct Lin {
    q: QMatMul,
    dense: Option<QMatMul>,
}

impl Lin {
    fn new(t: candle_core::quantized::QTensor, dense: bool) -> candle_core::Result<Self> {
        let dense = if dense {
            Some(QMatMul::Tensor(t.dequantize(&Device::Cpu)?))
        } else {
            None
        };
        Ok(Lin {
            q: QMatMul::from_qtensor(t)?,
            dense,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.dense {
            Some(d) if x.dim(1)? > 1 => d.forward(x),
            _ => self.q.forward(x),
        }
    }
}

struct Layer {
    wq: Lin,
    wk: Lin,
    wv: Lin,
    bias: Option<(Tensor, Tensor, Tensor)>,
    wo: Lin,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Lin,
    up: Lin,
    down: Lin,
}

/// Keys and values of every layer for the tokens run so far. Cloning is cheap (tensors are shared).
#[derive(Clone, Default)]
pub struct Cache {
    kv: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl Cache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

pub struct QuantLm {
    pub arch: Arch,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    device: Device,
}

pub(crate) fn md_u32(ct: &gguf_file::Content, key: &str) -> Result<usize, GgufError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| GgufError::Metadata(format!("missing key `{key}`")))?
        .to_u32()
        .map(|v| v as usize)
        .map_err(|e| GgufError::Metadata(format!("key `{key}`: {e}")))
}

fn md_f32(ct: &gguf_file::Content, key: &str) -> Option<f32> {
    ct.metadata.get(key).and_then(|v| v.to_f32().ok())
}

impl QuantLm {
    /// Loads the weights; `dense_prefill` also keeps f32 copies of the layer weights for fast
    /// multi-token passes (about 4 bytes a parameter more memory).
    pub fn load(
        path: &Path,
        ct: &gguf_file::Content,
        dense_prefill: bool,
    ) -> Result<Self, GgufError> {
        let arch_name = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(GgufError::Unsupported(format!(
                    "{}: architecture {other:?} is not supported (supported: llama, qwen2)",
                    path.display()
                )))
            }
        };
        let p = arch.prefix();
        let n_head = md_u32(ct, &format!("{p}.attention.head_count"))?;
        let n_kv_head = md_u32(ct, &format!("{p}.attention.head_count_kv"))?;
        let embd = md_u32(ct, &format!("{p}.embedding_length"))?;
        let n_layer = md_u32(ct, &format!("{p}.block_count"))?;
        let context_length = md_u32(ct, &format!("{p}.context_length"))?.min(8192);
        let eps =
            md_f32(ct, &format!("{p}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6) as f64;
        let freq_base = md_f32(ct, &format!("{p}.rope.freq_base")).unwrap_or(10_000.0);
        if n_head == 0 || n_kv_head == 0 || embd % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(GgufError::Metadata(format!(
                "inconsistent head counts: {n_head} heads, {n_kv_head} kv heads, width {embd}"
            )));
        }
        let head_dim = embd / n_head;
        let device = Device::Cpu;
        let mut file = File::open(path).map_err(|e| GgufError::Io(path.to_path_buf(), e))?;
        let mut t = |name: &str| {
            ct.tensor(&mut file, name, &device)
                .map_err(|e| GgufError::Tensor(format!("{}: tensor `{name}`: {e}", path.display())))
        };
        let embed_q = t("token_embd.weight")?;
        let embed = embed_q.dequantize(&device)?;
        let vocab_size = embed.dim(0)?;
        let norm = RmsNorm::from_qtensor(t("output_norm.weight")?, eps)?;
        let output = match t("output.weight") {
            Ok(w) => QMatMul::from_qtensor(w)?,
            Err(_) => QMatMul::from_qtensor(embed_q)?,
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let b = format!("blk.{i}");
            let q = |s: &str| format!("{b}.{s}");
            let bias = match arch {
                Arch::Qwen2 => Some((
                    t(&q("attn_q.bias"))?.dequantize(&device)?,
                    t(&q("attn_k.bias"))?.dequantize(&device)?,
                    t(&q("attn_v.bias"))?.dequantize(&device)?,
                )),
                Arch::Llama => None,
            };
            layers.push(Layer {
                wq: Lin::new(t(&q("attn_q.weight"))?, dense_prefill)?,
                wk: Lin::new(t(&q("attn_k.weight"))?, dense_prefill)?,
                wv: Lin::new(t(&q("attn_v.weight"))?, dense_prefill)?,
                bias,
                wo: Lin::new(t(&q("attn_output.weight"))?, dense_prefill)?,
                attn_norm: RmsNorm::from_qtensor(t(&q("attn_norm.weight"))?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(t(&q("ffn_norm.weight"))?, eps)?,
                gate: Lin::new(t(&q("ffn_gate.weight"))?, dense_prefill)?,
                up: Lin::new(t(&q("ffn_up.weight"))?, dense_prefill)?,
                down: Lin::new(t(&q("ffn_down.weight"))?, dense_prefill)?,
            });
        }
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / freq_base.powf(i as f32 / head_dim as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), &device)?;
        let pos = Tensor::arange(0, context_length as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((context_length, 1))?;
        let angles = pos.matmul(&theta.reshape((1, head_dim / 2))?)?;
        Ok(QuantLm {
            arch,
            embed,
            layers,
            norm,
            output,
            cos: angles.cos()?,
            sin: angles.sin()?,
            n_head,
            n_kv_head,
            head_dim,
            context_length,
            vocab_size,
            device,
        })
    }

    fn rope(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        match self.arch {
            // llama.cpp stores llama's q/k permuted for interleaved rotary pairs.
            Arch::Llama => candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin),
            Arch::Qwen2 => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin),
        }
    }

    /// Runs `tokens` after what `cache` holds; returns the logits (`[seq, vocab]` or `[1, vocab]`)
    /// and the cache extended by these tokens. The input cache is left as it was.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &Cache,
        which: Logits,
    ) -> Result<(Tensor, Cache), GgufError> {
        let seq = tokens.len();
        if seq == 0 {
            return Err(GgufError::Input("nothing to run: no tokens".into()));
        }
        let past = cache.len;
        if past + seq > self.context_length {
            return Err(GgufError::Input(format!(
                "{} tokens exceed the context of {} tokens",
                past + seq,
                self.context_length
            )));
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        let mask = if seq > 1 {
            let m: Vec<f32> = (0..seq)
                .flat_map(|i| {
                    (0..past + seq).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Some(Tensor::from_vec(m, (seq, past + seq), &self.device)?)
        } else {
            None
        };
        let mut next = Cache {
            kv: Vec::with_capacity(self.layers.len()),
            len: past + seq,
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let (mut q, mut k, mut v) = (
                layer.wq.forward(&h)?,
                layer.wk.forward(&h)?,
                layer.wv.forward(&h)?,
            );
            if let Some((bq, bk, bv)) = &layer.bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let q = q
                .reshape((1, seq, self.n_head, self.head_dim))?
                .transpose(1, 2)?;
            let k = k
                .reshape((1, seq, self.n_kv_head, self.head_dim))?
                .transpose(1, 2)?;
            let v = v
                .reshape((1, seq, self.n_kv_head, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = self.rope(&q, past)?;
            let k = self.rope(&k, past)?;
            let (k, v) = match cache.kv.get(li) {
                Some((pk, pv)) if past > 0 => {
                    (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)
                }
                _ => (k, v),
            };
            next.kv.push((k.clone(), v.clone()));
            let rep = self.n_head / self.n_kv_head;
            let k = repeat_kv(&k, rep)?;
            let v = repeat_kv(&v, rep)?;
            let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
            let att = match &mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y =
                att.matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((1, seq, self.n_head * self.head_dim))?;
            let x1 = (layer.wo.forward(&y)? + &x)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let ff = layer.down.forward(
                &(candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?,
            )?;
            x = (ff + x1)?;
        }
        let x = self.norm.forward(&x)?.squeeze(0)?;
        let x = match which {
            Logits::All => x,
            Logits::Last => x.i(seq - 1..seq)?,
        };
        let logits = self.output.forward(&x)?;
        Ok((logits, next))
    }
}

fn repeat_kv(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, h, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, h, n, s, d))?
        .reshape((b, h * n, s, d))
}

/// Log-softmax of one row of logits.
pub fn log_softmax_row(logits: &Tensor, row: usize) -> Result<Vec<f32>, GgufError> {
    let r = logits.i(row)?.to_dtype(DType::F32)?;
    Ok(candle_nn::ops::log_softmax(&r, D::Minus1)?.to_vec1::<f32>()?)
}
