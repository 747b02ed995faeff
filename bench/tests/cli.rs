//! Tests of `offload synth` and `offload inspect`, run through the built
//! binary, on synthetic checkpoints and on the real files in
//! `../shared/data` (see its README).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use offload_loader::layout::ModelLayout;
use offload_loader::synth::{header_bytes, preset_specs, Preset, PresetOptions};
use offload_loader::Dtype;
use serde_json::Value;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data");

fn offload(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(args)
        .output()
        .expect("run the offload binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `offload ARGS` and returns its stdout; fails the test (with both
/// streams) unless it succeeds.
fn ok(args: &[&str]) -> String {
    let o = offload(args);
    assert!(
        o.status.success(),
        "offload {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs `offload ARGS`, expects failure without a panic, and returns
/// stderr.
fn fails(args: &[&str]) -> String {
    let o = offload(args);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "offload {} should have failed:\nstdout:\n{}\nstderr:\n{err}",
        args.join(" "),
        stdout(&o)
    );
    assert!(
        !err.contains("panicked"),
        "offload {} panicked:\n{err}",
        args.join(" ")
    );
    err
}

/// One JSON object per line.
fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn json_one(args: &[&str]) -> Value {
    let mut v = json_lines(&ok(args));
    assert_eq!(
        v.len(),
        1,
        "offload {} printed {} objects",
        args.join(" "),
        v.len()
    );
    v.remove(0)
}

/// A fresh temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("offload-cli-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }

    fn s(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The `*.safetensors` files of `../shared/data/SUB`, with a clear failure
/// when the folder is missing.
fn data_files(sub: &str) -> Vec<PathBuf> {
    let dir = Path::new(DATA).join(sub);
    let rd = fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the real test files are missing: cannot read {} ({e}); the repository expects ../shared/data beside its clone",
            dir.display()
        )
    });
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no .safetensors files in {}", dir.display());
    v
}

fn data_file(sub: &str, name: &str) -> String {
    let p = Path::new(DATA).join(sub).join(name);
    assert!(
        p.is_file(),
        "real test file {} is missing (see ../shared/data/README.md)",
        p.display()
    );
    p.to_str().unwrap().to_owned()
}

fn preset_opts(scale: u64) -> PresetOptions {
    PresetOptions {
        scale,
        dtype: Dtype::F16,
        text_encoders: true,
        vae: true,
    }
}

#[test]
fn synth_sdxl_then_inspect() {
    let dir = TempDir::new("sdxl");
    let out = ok(&[
        "synth",
        "sdxl",
        "--scale",
        "16",
        "--lora-rank",
        "4",
        "-o",
        dir.s(),
    ]);
    let model = dir.join("sdxl.safetensors");
    let lora = dir.join("sdxl-lora-kohya-r4.safetensors");
    assert!(out.contains(&format!("wrote {}", model.display())), "{out}");
    assert!(out.contains(&format!("wrote {}", lora.display())), "{out}");
    assert!(out.contains("2514 tensors"), "{out}");

    // What the loader says the layout is, built from the same specs.
    let specs = preset_specs(Preset::Sdxl, &preset_opts(16));
    let want = ModelLayout::from_specs(&model, &specs);
    let want_layers: usize = want.components.iter().map(|c| c.layers.len()).sum();

    let m = model.to_str().unwrap();
    let v = json_one(&["inspect", "--json", m]);
    assert_eq!(v["path"], m);
    assert_eq!(v["kind"], "model");
    assert_eq!(v["tensors"], specs.len());
    assert_eq!(v["tensors"], 2514);
    assert_eq!(v["layers"], want_layers);
    assert_eq!(v["bytes"], want.bytes());
    assert_eq!(v["files"][0]["path"], m);
    assert_eq!(v["files"][0]["bytes"], fs::metadata(&model).unwrap().len());
    assert_eq!(v["dtypes"]["F16"]["tensors"], 2514);
    assert_eq!(v["dtypes"]["F16"]["bytes"], want.bytes());
    let (lc, ll) = want.largest_layer().unwrap();
    assert_eq!(v["largest_layer"]["component"], lc.name.as_str());
    assert_eq!(v["largest_layer"]["name"], ll.name.as_str());
    assert_eq!(v["largest_layer"]["bytes"], ll.bytes());
    let comps = v["components"].as_array().unwrap();
    let names: Vec<&str> = comps.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["text_encoder", "text_encoder_2", "unet", "vae"]);
    let kinds: Vec<&str> = comps.iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["text_encoder", "text_encoder", "denoiser", "vae"]);
    for (c, w) in comps.iter().zip(&want.components) {
        assert_eq!(c["name"], w.name.as_str());
        assert_eq!(c["prefix"], w.prefix.as_str());
        assert_eq!(c["layers"], w.layers.len(), "layers of {}", w.name);
        assert_eq!(c["tensors"], w.tensor_count());
        assert_eq!(c["bytes"], w.bytes());
        let l = w.largest_layer().unwrap();
        assert_eq!(c["largest_layer"]["name"], l.name.as_str());
        assert_eq!(c["largest_layer"]["bytes"], l.bytes());
        assert!(c["dtypes"]["F16"]["tensors"].is_u64());
    }
    assert_eq!(comps[0]["prefix"], "conditioner.embedders.0.transformer.");
    assert_eq!(comps[2]["prefix"], "model.diffusion_model.");

    // Text: the same numbers.
    let text = ok(&["inspect", m]);
    assert!(
        text.contains("2514 tensors")
            && text.contains(&format!("{want_layers} layers in 4 components")),
        "{text}"
    );
    for n in names {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(n)),
            "{n}: {text}"
        );
    }

    // The LoRA: recognised and fully matched against the model.
    let l = lora.to_str().unwrap();
    let v = json_one(&["inspect", "--json", l, "--model", m]);
    assert_eq!(v["kind"], "lora");
    assert_eq!(v["convention"], "kohya");
    assert_eq!(v["algorithms"]["lora"], v["modules"]);
    assert_eq!(v["ranks"], serde_json::json!([4]));
    assert_eq!(v["alphas"], serde_json::json!([4.0]));
    assert_eq!(v["supported"], true);
    let modules = v["modules"].as_u64().unwrap();
    assert!(modules > 0);
    assert_eq!(v["match"]["model"], m);
    assert_eq!(v["match"]["modules"], modules);
    assert_eq!(v["match"]["matched"], modules);
    assert_eq!(v["match"]["skipped"], 0);
    assert_eq!(v["match"]["error"], Value::Null);

    // Both at once, in order, one object each.
    let both = json_lines(&ok(&["inspect", "--json", m, l]));
    assert_eq!(both.len(), 2);
    assert_eq!(both[0]["kind"], "model");
    assert_eq!(both[1]["kind"], "lora");
    assert_eq!(both[1]["match"], Value::Null);
}

#[test]
fn synth_flux_peft_with_alpha() {
    let dir = TempDir::new("flux");
    let out = ok(&[
        "synth",
        "flux",
        "--scale",
        "64",
        "--text-encoders",
        "--dtype",
        "bf16",
        "--seed",
        "7",
        "--lora-rank",
        "8",
        "--lora-convention",
        "peft",
        "--lora-alpha",
        "4",
        "-o",
        dir.s(),
    ]);
    // A peft adapter folder: the weights beside their own config.
    let adapter = dir.join("flux-lora-peft-r8");
    let weights = adapter.join("adapter_model.safetensors");
    let cfg_path = adapter.join("adapter_config.json");
    assert!(
        out.contains(&format!("wrote {}", weights.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!("wrote {}", cfg_path.display())),
        "{out}"
    );
    assert!(!dir.join("adapter_config.json").exists());
    let cfg: Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 4.0);
    let m = dir.join("flux.safetensors");
    let m = m.to_str().unwrap();
    let v = json_one(&["inspect", "--json", m]);
    let names: Vec<&str> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["clip_l", "t5xxl", "transformer"]);
    assert_eq!(v["dtypes"]["BF16"]["tensors"], v["tensors"]);
    // 19 double + 38 single blocks, plus the embedders and the head.
    let t = &v["components"][2];
    assert!(t["layers"].as_u64().unwrap() >= 57, "{t}");

    // The adapter folder and the file in it are the same LoRA, alpha from
    // its config.
    for l in [&adapter, &weights] {
        let v = json_one(&["inspect", "--json", l.to_str().unwrap(), "--model", m]);
        assert_eq!(v["kind"], "lora", "{v}");
        assert_eq!(v["convention"], "diffusers");
        assert_eq!(v["peft_alpha"], 4.0);
        assert_eq!(v["alphas"], serde_json::json!([]));
        assert_eq!(v["ranks"], serde_json::json!([8]));
        assert_eq!(v["match"]["matched"], v["modules"]);
    }
    // The output folder itself: the model alone (the adapter is in its own
    // folder).
    let v = json_one(&["inspect", "--json", dir.s()]);
    assert_eq!(v["kind"], "model");
    assert_eq!(v["files"].as_array().unwrap().len(), 1);

    // Without --lora-alpha the config says alpha = rank.
    let dir3 = TempDir::new("flux-peft-default-alpha");
    ok(&[
        "synth",
        "flux",
        "--scale",
        "64",
        "--lora-rank",
        "4",
        "--lora-convention",
        "peft",
        "-o",
        dir3.s(),
    ]);
    let a = dir3.join("flux-lora-peft-r4");
    let v = json_one(&["inspect", "--json", a.to_str().unwrap()]);
    assert_eq!(v["peft_alpha"], 4.0, "{v}");

    // Without --text-encoders: the transformer alone.
    let dir2 = TempDir::new("flux-bare");
    ok(&["synth", "flux", "--scale", "64", "-o", dir2.s()]);
    let v = json_one(&[
        "inspect",
        "--json",
        dir2.join("flux.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(v["components"].as_array().unwrap().len(), 1);
    assert_eq!(v["components"][0]["name"], "transformer");
}

/// `offload inspect` of a LoRA whose zero-element factor has dimensions
/// that multiply past 2^64 used to panic; it is an error naming the file,
/// the tensor and the shape.
#[test]
fn inspect_zero_element_overflowing_lora_is_an_error() {
    let dir = TempDir::new("zero-lora");
    let json = r#"{"m.lora_down.weight":{"dtype":"F16","shape":[0,1,1099511627776,1099511627776],"data_offsets":[0,0]},"m.lora_up.weight":{"dtype":"F16","shape":[4,0],"data_offsets":[0,0]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    let path = dir.join("zero_lora.safetensors");
    fs::write(&path, &bytes).unwrap();
    let p = path.to_str().unwrap();
    for args in [
        vec!["inspect", p],
        vec!["inspect", "--json", p, "--model-preset", "sd15"],
    ] {
        let err = fails(&args);
        for want in [
            p,
            "m.lora_down.weight",
            "[0, 1, 1099511627776, 1099511627776]",
            "overflows",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}

/// A FLUX repository's root: the transformer and a VAE side by side are
/// two components, not one; dotted names are no variants; `--variant`
/// picks a variant.
#[test]
fn inspect_folder_of_several_models_and_variants() {
    let dir = TempDir::new("flux-root");
    ok(&["synth", "flux", "--scale", "64", "-o", dir.s()]);
    fs::rename(
        dir.join("flux.safetensors"),
        dir.join("flux1-dev.safetensors"),
    )
    .unwrap();
    fs::copy(
        data_file("model", "taef1_decoder.safetensors"),
        dir.join("taef1_decoder.safetensors"),
    )
    .unwrap();
    let v = json_one(&["inspect", "--json", dir.s()]);
    let comps: Vec<(&str, &str)> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        comps,
        [("transformer", "denoiser"), ("taef1_decoder", "vae")]
    );
    let models: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["flux1-dev", "taef1_decoder"]);
    let t = ok(&["inspect", dir.s()]);
    assert!(
        t.contains("2 files") && t.contains("model flux1-dev"),
        "{t}"
    );

    // Two SDXL-style names with dots and a variant pair of another model.
    let dir = TempDir::new("variants");
    let taesd = data_file("model", "taesd_decoder.safetensors");
    fs::copy(&taesd, dir.join("sd_xl_base_1.0.safetensors")).unwrap();
    fs::copy(&taesd, dir.join("sd_xl_refiner_1.0.safetensors")).unwrap();
    let v = json_one(&["inspect", "--json", dir.s()]);
    let names: Vec<&str> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sd_xl_base_1.0", "sd_xl_refiner_1.0"]);

    let dir = TempDir::new("fp16");
    ok(&[
        "synth",
        "sd15",
        "--scale",
        "64",
        "--dtype",
        "f32",
        "-o",
        dir.s(),
    ]);
    fs::rename(dir.join("sd15.safetensors"), dir.join("model.safetensors")).unwrap();
    let d16 = TempDir::new("fp16-src");
    ok(&[
        "synth",
        "sd15",
        "--scale",
        "64",
        "--dtype",
        "f16",
        "-o",
        d16.s(),
    ]);
    fs::rename(
        d16.join("sd15.safetensors"),
        dir.join("model.fp16.safetensors"),
    )
    .unwrap();
    let v = json_one(&["inspect", "--json", dir.s()]);
    assert!(v["dtypes"]["F32"].is_object(), "{v}");
    assert_eq!(v["files"].as_array().unwrap().len(), 1);
    let v = json_one(&["inspect", "--json", "--variant", "fp16", dir.s()]);
    assert!(
        v["dtypes"]["F16"].is_object() && v["dtypes"]["F32"].is_null(),
        "{v}"
    );
    assert!(v["files"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("model.fp16.safetensors"));
    assert_eq!(v["components"].as_array().unwrap().len(), 3);
}

#[test]
fn synth_rejects_bad_arguments() {
    let dir = TempDir::new("bad-args");
    fails(&["synth", "sdxl", "--scale", "0", "-o", dir.s()]);
    fails(&["synth", "sd16", "-o", dir.s()]);
    fails(&["synth", "sd15", "--dtype", "f64", "-o", dir.s()]);
    fails(&["synth", "sd15", "--lora-convention", "peft", "-o", dir.s()]);
    fails(&["synth", "sd15", "--scale", "8"]);
    // The output folder is a file.
    let file = dir.join("file");
    fs::write(&file, b"x").unwrap();
    let err = fails(&[
        "synth",
        "sd15",
        "--scale",
        "64",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert!(err.contains(file.to_str().unwrap()), "{err}");
}

#[test]
fn inspect_every_real_model() {
    let files = data_files("model");
    let mut args = vec!["inspect", "--json"];
    let strs: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    args.extend(&strs);
    let all = json_lines(&ok(&args));
    assert_eq!(all.len(), files.len());
    for (v, f) in all.iter().zip(&strs) {
        assert_eq!(v["path"], *f);
        assert_eq!(v["kind"], "model", "{f} is a model: {v}");
        assert!(v["tensors"].as_u64().unwrap() > 0, "{f}: {v}");
        assert!(v["layers"].as_u64().unwrap() > 0, "{f}: {v}");
        assert!(!v["components"].as_array().unwrap().is_empty(), "{f}: {v}");
        assert!(
            v["largest_layer"]["bytes"].as_u64().unwrap() > 0,
            "{f}: {v}"
        );
    }
    // What the README says about them.
    let by_name: BTreeMap<String, &Value> = all
        .iter()
        .map(|v| {
            let p = Path::new(v["path"].as_str().unwrap());
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    for taesd in ["taesd_decoder", "taesdxl_decoder", "taef1_decoder"] {
        let v = by_name
            .get(&format!("{taesd}.safetensors"))
            .unwrap_or_else(|| panic!("{taesd}.safetensors missing from {DATA}/model"));
        assert_eq!(v["tensors"], 67);
        assert_eq!(v["dtypes"]["BF16"]["tensors"], 67);
        assert_eq!(v["components"][0]["kind"], "vae", "{v}");
    }
    let v = by_name
        .get("sdxl_ldm_text_projection_slice.safetensors")
        .expect("sdxl_ldm_text_projection_slice.safetensors missing");
    assert_eq!(v["tensors"], 3);
    assert_eq!(v["dtypes"]["F16"]["tensors"], 3);
    for c in v["components"].as_array().unwrap() {
        assert_eq!(c["kind"], "text_encoder", "{v}");
    }
    // Text output for each, too.
    for f in &strs {
        let t = ok(&["inspect", f]);
        assert!(t.starts_with(&format!("{f}: model, 1 file, ")), "{t}");
        assert!(t.contains("largest layer"), "{t}");
    }
}

/// What each real LoRA is: (convention, algorithms, ranks, supported).
fn expected_lora(name: &str) -> Option<(&'static str, Value, Value, bool)> {
    use serde_json::json;
    Some(match name {
        "smart_falcon_4_lokr.safetensors" => ("kohya", json!({"lokr": 350}), json!([4]), true),
        "smart_falcon_8_lokr.safetensors" => ("kohya", json!({"lokr": 350}), json!([8]), true),
        "smart_falcon_16_lokr.safetensors" => ("kohya", json!({"lokr": 350}), json!([16]), true),
        "sd15_diffusers_legacy_catundchat.safetensors" => {
            ("diffusers_legacy", json!({"lora": 128}), json!([4]), true)
        }
        "lora_disney.safetensors" => ("cloneofsimo", json!({}), json!([1]), false),
        "analog_svd_rank4.safetensors" => ("cloneofsimo", json!({}), json!([4]), false),
        _ => return None,
    })
}

#[test]
fn inspect_every_real_lora() {
    for f in data_files("lora") {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let (conv, algos, ranks, supported) = expected_lora(&name).unwrap_or_else(|| {
            panic!(
                "no expectation for {}: add it to expected_lora",
                f.display()
            )
        });
        let p = f.to_str().unwrap();
        let v = json_one(&["inspect", "--json", p]);
        assert_eq!(v["kind"], "lora", "{name}: {v}");
        assert_eq!(v["convention"], conv, "{name}: {v}");
        assert_eq!(v["algorithms"], algos, "{name}: {v}");
        assert_eq!(v["ranks"], ranks, "{name}: {v}");
        assert_eq!(v["supported"], supported, "{name}: {v}");
        assert_eq!(v["match"], Value::Null);
        if conv == "cloneofsimo" {
            assert!(v["cloneofsimo_keys"].as_u64().unwrap() > 0, "{name}: {v}");
            let why = v["unsupported"][0].as_str().unwrap();
            assert!(why.contains("cloneofsimo"), "{name}: {why}");
            let t = ok(&["inspect", p]);
            assert!(t.contains("convention: cloneofsimo positional"), "{t}");
            assert!(t.contains("unsupported: cloneofsimo"), "{t}");
        }
        if name.starts_with("smart_falcon_") {
            let r = ranks[0].as_f64().unwrap();
            assert_eq!(v["alphas"], serde_json::json!([r]), "dim = alpha: {v}");
            assert_eq!(v["modules"], 350);
            assert_eq!(v["tensors"], 1750);
            let t = ok(&["inspect", p]);
            assert!(
                t.contains("convention: kohya") && t.contains("algorithms: LoKr 350"),
                "{t}"
            );
        }
    }
}

#[test]
fn real_loras_against_full_size_sd15_preset() {
    for name in [
        "smart_falcon_4_lokr.safetensors",
        "smart_falcon_8_lokr.safetensors",
        "smart_falcon_16_lokr.safetensors",
    ] {
        let p = data_file("lora", name);
        let v = json_one(&["inspect", "--json", &p, "--model-preset", "sd15"]);
        let m = &v["match"];
        assert_eq!(m["modules"], 350, "{name}: {m}");
        assert_eq!(m["matched"], 350, "{name}: {m}");
        assert_eq!(m["skipped"], 0, "{name}: {m}");
        assert_eq!(m["problems"], serde_json::json!({}), "{name}: {m}");
        let t = ok(&["inspect", &p, "--model-preset", "sd15"]);
        assert!(t.contains("350 of 350 modules matched"), "{t}");
    }
    let p = data_file("lora", "sd15_diffusers_legacy_catundchat.safetensors");
    let v = json_one(&["inspect", "--json", &p, "--model-preset", "sd15"]);
    assert_eq!(v["match"]["matched"], 128, "{v}");
    assert_eq!(v["match"]["skipped"], 0, "{v}");

    // cloneofsimo: recognised, reported, not an error of the command.
    let p = data_file("lora", "lora_disney.safetensors");
    let v = json_one(&["inspect", "--json", &p, "--model-preset", "sd15"]);
    assert_eq!(v["match"]["matched"], 0);
    assert!(
        v["match"]["error"]
            .as_str()
            .unwrap()
            .contains("cloneofsimo"),
        "{v}"
    );
}

#[test]
fn lokr_against_sdxl_lists_skipped_keys() {
    // An SD 1.x LoKr on SDXL: some keys have no target, some the wrong
    // shape; every one is listed with its problem.
    let p = data_file("lora", "smart_falcon_4_lokr.safetensors");
    let v = json_one(&["inspect", "--json", &p, "--model-preset", "sdxl"]);
    let m = &v["match"];
    let skipped = m["skipped_keys"].as_array().unwrap();
    assert!(!skipped.is_empty());
    assert_eq!(m["skipped"], skipped.len());
    assert_eq!(
        m["matched"].as_u64().unwrap() + skipped.len() as u64,
        350,
        "{m}"
    );
    let sum: u64 = m["problems"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(sum, skipped.len() as u64);
    for s in skipped {
        assert!(s["key"].as_str().unwrap().starts_with("lora_"), "{s}");
        let kind = s["problem"].as_str().unwrap();
        assert!(
            [
                "unmatched",
                "shape_mismatch",
                "malformed",
                "unsupported",
                "unknown_key"
            ]
            .contains(&kind),
            "{s}"
        );
        assert!(!s["detail"].as_str().unwrap().is_empty());
    }
    let t = ok(&["inspect", &p, "--model-preset", "sdxl"]);
    let first = skipped[0]["key"].as_str().unwrap();
    assert!(t.contains(&format!("`{first}` [")), "{t}");
}

/// A full-size checkpoint whose data section is a hole: the real header of
/// the preset, the right length, no bytes written (sparse).
fn sparse_checkpoint(path: &Path, preset: Preset) {
    let specs = preset_specs(preset, &preset_opts(1));
    let header = header_bytes(path, &specs, &BTreeMap::new()).unwrap();
    let data: u64 = specs.iter().map(|s| s.byte_len().unwrap()).sum();
    let mut f = fs::File::create(path).unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    f.set_len(8 + header.len() as u64 + data).unwrap();
}

#[test]
fn lokr_against_full_size_sd15_file() {
    let dir = TempDir::new("sparse-sd15");
    let model = dir.join("sd15.safetensors");
    sparse_checkpoint(&model, Preset::Sd15);
    let m = model.to_str().unwrap();
    let v = json_one(&["inspect", "--json", m]);
    assert_eq!(v["kind"], "model");
    assert_eq!(v["dtypes"]["F16"]["tensors"], v["tensors"]);
    let p = data_file("lora", "smart_falcon_8_lokr.safetensors");
    let v = json_one(&["inspect", "--json", &p, "--model", m]);
    assert_eq!(v["match"]["model"], m);
    assert_eq!(v["match"]["matched"], 350, "{v}");
    assert_eq!(v["match"]["skipped"], 0, "{v}");
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = TempDir::new("bad");
    let missing = dir.join("missing.safetensors");
    let missing = missing.to_str().unwrap();
    let err = fails(&["inspect", missing]);
    assert!(err.contains(missing), "{err}");

    for (sub, name) in [
        ("lora", "smart_falcon_4_lokr.safetensors"),
        ("model", "taesd_decoder.safetensors"),
    ] {
        let bytes = fs::read(data_file(sub, name)).unwrap();
        // Truncated: half the data section gone.
        let cut = dir.join(format!("truncated_{name}"));
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let c = cut.to_str().unwrap();
        let err = fails(&["inspect", c]);
        assert!(err.contains(c), "{err}");
        let err = fails(&["inspect", "--json", c]);
        assert!(err.contains(c), "{err}");
        // Shorter than the header length.
        let tiny = dir.join(format!("tiny_{name}"));
        fs::write(&tiny, &bytes[..5]).unwrap();
        let t = tiny.to_str().unwrap();
        assert!(fails(&["inspect", t]).contains(t));
        // Header bytes flipped: not JSON, or a wrong structure.
        let mut flipped = bytes.clone();
        for b in &mut flipped[8..40] {
            *b ^= 0x5a;
        }
        let fl = dir.join(format!("flipped_{name}"));
        fs::write(&fl, &flipped).unwrap();
        let f = fl.to_str().unwrap();
        assert!(fails(&["inspect", f]).contains(f));
        // Absurd header length.
        let mut absurd = bytes.clone();
        absurd[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let ab = dir.join(format!("absurd_{name}"));
        fs::write(&ab, &absurd).unwrap();
        let a = ab.to_str().unwrap();
        assert!(fails(&["inspect", a]).contains(a));
    }

    // A corrupt --model names the model.
    let cut = dir.join("truncated_taesd_decoder.safetensors");
    let lora = data_file("lora", "smart_falcon_4_lokr.safetensors");
    let err = fails(&["inspect", &lora, "--model", cut.to_str().unwrap()]);
    assert!(
        err.contains("--model") && err.contains(cut.to_str().unwrap()),
        "{err}"
    );
    // A LoRA is not a model.
    let err = fails(&["inspect", &lora, "--model", &lora]);
    assert!(err.contains("not a model"), "{err}");

    // A folder without safetensors files.
    let empty = TempDir::new("empty");
    assert!(fails(&["inspect", empty.s()]).contains(empty.s()));
}

#[test]
fn one_bad_path_among_good_ones() {
    let dir = TempDir::new("mixed");
    let good = data_file("model", "taesd_decoder.safetensors");
    let bad = dir.join("nope.safetensors");
    let bad = bad.to_str().unwrap();
    let o = offload(&["inspect", "--json", &good, bad]);
    assert!(!o.status.success());
    let v = json_lines(&stdout(&o));
    assert_eq!(v.len(), 2, "one object per path");
    assert_eq!(v[0]["kind"], "model");
    assert_eq!(v[1]["kind"], "error");
    assert_eq!(v[1]["path"], bad);
    assert!(v[1]["error"].as_str().unwrap().contains(bad));
    let err = stderr(&o);
    assert!(err.contains(bad) && err.contains("1 of 2 paths"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn hidden_bench_flag() {
    let p = data_file("model", "taesd_decoder.safetensors");
    let t = ok(&["inspect", "--bench", "3", &p]);
    assert!(t.contains("per 1,000 tensors: mean header parse"), "{t}");
    let v = json_one(&["inspect", "--bench", "2", "--json", &p]);
    assert_eq!(v["bench"]["runs"], 2);
    assert_eq!(v["bench"]["tensors"], 67);
    assert!(v["bench"]["total_us_per_1000_tensors"].as_f64().unwrap() > 0.0);
    // Hidden from --help.
    let help = ok(&["inspect", "--help"]);
    assert!(!help.contains("--bench"), "{help}");
    assert!(help.contains("--model-preset"), "{help}");
}

/// An invalid `OFFLOAD_MERGE_KERNEL` is an error naming the variable and
/// the value on any machine (not a silent run on the host backend), with
/// no panic; `auto`, `pipelined` and `tensor-cores` are accepted.
#[test]
#[cfg(feature = "cuda")]
fn offload_device_rejects_an_unknown_merge_kernel() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_offload"))
            .arg("device")
            .env("OFFLOAD_MERGE_KERNEL", value)
            .output()
            .expect("run the offload binary")
    };
    let o = run("bogus");
    let err = stderr(&o);
    assert!(!o.status.success(), "accepted: {}", stdout(&o));
    assert!(
        err.contains("OFFLOAD_MERGE_KERNEL") && err.contains("bogus") && !err.contains("panicked"),
        "{err}"
    );
    for good in ["auto", "pipelined", "tensor-cores", ""] {
        let o = run(good);
        assert!(o.status.success(), "{good:?}: {}", stderr(&o));
    }
}

/// `offload device --prepare` names the device, then says for each kernel
/// family how it was built: nothing to build on the host backend, the
/// cuBLAS library and how NVRTC built the merge kernels on a GPU.
#[test]
fn offload_device_prepare_says_how_each_kernel_family_was_built() {
    let lines = |o: &std::process::Output| -> Vec<String> {
        stdout(o).lines().map(str::to_string).collect()
    };
    let plain = Command::new(env!("CARGO_BIN_EXE_offload"))
        .arg("device")
        .output()
        .expect("run the offload binary");
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert_eq!(lines(&plain).len(), 1, "{}", stdout(&plain));
    let o = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["device", "--prepare"])
        .output()
        .expect("run the offload binary");
    assert!(o.status.success(), "{}", stderr(&o));
    let l = lines(&o);
    assert_eq!(l.len(), 3, "{}", stdout(&o));
    assert_eq!(l[0], lines(&plain)[0]);
    if l[0].starts_with("using the host backend") {
        assert_eq!(l[1], "matrix products: nothing to build on this device");
        assert_eq!(l[2], "merge kernels: nothing to build on this device");
    } else {
        assert!(l[1].starts_with("matrix products: "), "{}", l[1]);
        assert!(l[2].starts_with("merge kernels for "), "{}", l[2]);
    }
}
