//! A checkpoint that changes underneath a run: the runtime streams a real
//! model file (the tiny SD VAE decoder from ../shared/data, copied to a
//! scratch folder) with the staged host policy, re-reading every layer on
//! every pass, while the test truncates or replaces the file. Tensor bytes
//! are read with checked positional reads, never through a memory map, so
//! a truncated file ends the run with an error that names the file (never a
//! SIGBUS), and every layer handed out before that is byte-exact.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use offload_loader::Model;
use offload_runtime::device::{DeviceExt, HostDevice, StreamId};
use offload_runtime::residency::{LayerId, ModelId, Runtime};
use offload_runtime::Error;
use offload_tests::source::{describe, LoaderSource};
use offload_tests::{shared_data, Scratch};

const PAGE: usize = 64 << 10;

struct Run {
    dev: Arc<HostDevice>,
    compute: StreamId,
    rt: Runtime,
    m: ModelId,
    /// Expected bytes of each tensor, by (component, layer), cut from the file as it was.
    expect: Vec<Vec<Vec<Vec<u8>>>>,
}

/// Open `path` with the loader and stream it: sequential mode, staged host policy.
fn start(path: &Path) -> Run {
    let original = std::fs::read(path).unwrap();
    let model = Arc::new(Model::open(path).unwrap());
    let desc = describe("taesd_decoder", &model.layout);
    let expect = offload_tests::tensor_bytes(&model.layout, &original);
    let (dev, compute, rt) = offload_tests::streaming_runtime(PAGE, 2, PAGE, 1);
    let m = rt.load(desc, Arc::new(LoaderSource::new(model))).unwrap();
    Run {
        dev,
        compute,
        rt,
        m,
        expect,
    }
}

impl Run {
    fn layers(&self) -> Vec<(usize, usize)> {
        self.expect
            .iter()
            .enumerate()
            .flat_map(|(c, ls)| (0..ls.len()).map(move |l| (c, l)))
            .collect()
    }

    /// Acquire a layer and compare its bytes on the compute stream: Ok(bytes checked).
    fn check(&self, c: usize, l: usize) -> Result<usize, Error> {
        let g = self.rt.acquire(LayerId {
            model: self.m,
            component: c,
            layer: l,
        })?;
        let mut n = 0;
        for (t, v) in g.tensors().enumerate() {
            let mut back = vec![0u8; v.bytes];
            self.dev.read_blocking(v.ptr, &mut back, self.compute)?;
            assert!(
                back == self.expect[c][l][t],
                "tensor {} handed out with bytes that are not the file's",
                v.name
            );
            n += v.bytes;
        }
        Ok(n)
    }

    /// Whole passes until the first error (at most `passes`); the error, if any, and the bytes checked.
    fn passes(
        &self,
        passes: usize,
        mut before_layer: impl FnMut(usize, usize),
    ) -> (Option<Error>, usize) {
        let mut checked = 0;
        for p in 0..passes {
            for (i, (c, l)) in self.layers().into_iter().enumerate() {
                before_layer(p, i);
                match self.check(c, l) {
                    Ok(n) => checked += n,
                    Err(e) => return (Some(e), checked),
                }
            }
        }
        (None, checked)
    }

    /// Drop the runtime and check that every page came back.
    fn finish(self) {
        let dev = self.dev.clone();
        drop(self);
        let c = dev.counters();
        assert_eq!(
            (c.pages_allocated, c.pages_mapped, c.ranges_reserved),
            (0, 0, 0)
        );
    }
}

fn copy_of(name: &str, scratch: &Scratch) -> std::path::PathBuf {
    let path = scratch.join(name);
    std::fs::copy(shared_data(&format!("model/{name}")), &path).unwrap();
    path
}

#[test]
fn a_checkpoint_truncated_mid_run_ends_the_run_with_an_error_naming_the_file() {
    let scratch = Scratch::new("truncated-mid-run");
    let path = copy_of("taesd_decoder.safetensors", &scratch);
    let run = start(&path);
    let total: usize = run.expect.iter().flatten().flatten().map(Vec::len).sum();
    let (err, checked) = run.passes(1, |_, _| {});
    assert!(err.is_none(), "pass 1: {err:?}");
    assert_eq!(checked, total, "pass 1 checked every byte of the file");
    // Pass 2: halfway through, the file is cut to half its length.
    let len = std::fs::metadata(&path).unwrap().len();
    let half = run.layers().len() / 2;
    let (err, checked) = run.passes(3, |p, i| {
        if p == 0 && i == half {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }
    });
    let err = err.expect("the run went on over a truncated file");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "the error names the file: {msg}"
    );
    assert!(msg.contains("truncated"), "and says what happened: {msg}");
    assert!(checked > 0, "layers read before the cut were handed out");
    run.finish();
}

#[test]
fn a_checkpoint_truncated_while_reader_threads_stream_it() {
    // The cut happens at an arbitrary moment from another thread, while the
    // stager reads ahead; the run must end with an error naming the file.
    let scratch = Scratch::new("truncated-concurrently");
    let path = copy_of("taesd_decoder.safetensors", &scratch);
    let run = start(&path);
    let p2 = path.clone();
    let cutter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p2)
            .unwrap()
            .set_len(100)
            .unwrap();
    });
    let (err, _) = run.passes(10_000, |_, _| {});
    cutter.join().unwrap();
    let msg = err
        .expect("the run went on over a truncated file")
        .to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "the error names the file: {msg}"
    );
    run.finish();
}

#[test]
fn a_checkpoint_replaced_by_rename_keeps_streaming_the_file_that_was_opened() {
    // Replacing by rename (what downloaders and `mv` do) leaves the open file
    // intact: the run goes on with the bytes it opened, all exact.
    let scratch = Scratch::new("replaced-by-rename");
    let path = copy_of("taesd_decoder.safetensors", &scratch);
    let other = copy_of("sdxl_ldm_text_projection_slice.safetensors", &scratch);
    let run = start(&path);
    let (err, _) = run.passes(1, |p, i| {
        if p == 0 && i == 3 {
            std::fs::rename(&other, &path).unwrap();
        }
    });
    assert!(err.is_none(), "{err:?}");
    let (err, checked) = run.passes(2, |_, _| {});
    assert!(err.is_none(), "{err:?}");
    assert!(checked > 0);
    run.finish();
}

#[test]
fn a_checkpoint_rewritten_in_place_shorter_ends_the_run_with_an_error_naming_the_file() {
    // `cp other path` truncates the file and writes the other one into it.
    let scratch = Scratch::new("rewritten-shorter");
    let path = copy_of("taesd_decoder.safetensors", &scratch);
    let run = start(&path);
    let shorter = vec![7u8; 100];
    let (err, _) = run.passes(3, |p, i| {
        if p == 1 && i == 0 {
            std::fs::write(&path, &shorter).unwrap();
        }
    });
    let msg = err
        .expect("the run went on over a rewritten file")
        .to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "the error names the file: {msg}"
    );
    run.finish();
}

#[test]
fn a_checkpoint_rewritten_in_place_longer_ends_the_run_with_an_error_naming_the_file() {
    let scratch = Scratch::new("rewritten-longer");
    let path = copy_of("taesd_decoder.safetensors", &scratch);
    let run = start(&path);
    let longer = std::fs::read(shared_data(
        "model/sdxl_ldm_text_projection_slice.safetensors",
    ))
    .unwrap();
    // `check` panics when a layer comes back with bytes that are not the model's.
    let (err, _) = run.passes(3, |p, i| {
        if p == 1 && i == 0 {
            std::fs::write(&path, &longer).unwrap();
        }
    });
    let msg = err
        .expect("the run went on over a rewritten file")
        .to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "the error names the file: {msg}"
    );
    run.finish();
}
