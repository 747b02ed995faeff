//! Whole flow: a model file's layers placed in the page arena, one packed
//! allocation per layer, uploaded through pinned memory and async copies,
//! then read back and compared byte for byte with the file.

use std::collections::BTreeMap;
use std::sync::Arc;

use offload_loader::synth::{
    deterministic_bytes, preset_specs, write_deterministic, Preset, PresetOptions,
};
use offload_loader::{Dtype, Model};
use offload_runtime::arena::{pack, AllocId, Arena, ArenaConfig, Tag, TagUsage};
use offload_runtime::device::{Device, HostConfig, HostDevice};
use offload_tests::{shared_data, Scratch};

const PAGE: usize = 64 << 10;

struct Placed {
    id: AllocId,
    offsets: Vec<usize>,
}

/// Place every layer of `model` in `arena`: read each tensor into a pinned
/// buffer with checked positional reads, copy it to its offset in the
/// layer's allocation, and wait.
fn place(model: &Model, arena: &Arena<HostDevice>) -> Vec<(String, Placed)> {
    let dev = arena.device().clone();
    let stream = dev.create_stream().unwrap();
    let mut placed = Vec::new();
    for (ci, comp) in model.layout.components.iter().enumerate() {
        for layer in &comp.layers {
            let sizes: Vec<usize> = layer.tensors.iter().map(|t| t.len as usize).collect();
            let (id, packed) = arena.alloc_packed(&sizes, Tag(ci as u32)).unwrap();
            let base = arena.ptr(id).unwrap();
            let mut staging = dev.alloc_pinned(packed.total.max(1)).unwrap();
            for (t, &off) in layer.tensors.iter().zip(&packed.offsets) {
                let dst = &mut staging.as_mut_slice()[off..off + t.len as usize];
                model.read_tensor_into(t, dst).unwrap();
            }
            for (t, &off) in layer.tensors.iter().zip(&packed.offsets) {
                if t.len == 0 {
                    continue;
                }
                // SAFETY: `staging` outlives the copy: the stream is synchronised below.
                unsafe {
                    dev.copy_h2d_async(
                        base.offset(off),
                        staging.as_ptr().add(off),
                        t.len as usize,
                        stream,
                    )
                    .unwrap()
                };
            }
            dev.stream_synchronize(stream).unwrap();
            placed.push((
                format!("{}/{}", comp.name, layer.name),
                Placed {
                    id,
                    offsets: packed.offsets,
                },
            ));
        }
    }
    dev.destroy_stream(stream).unwrap();
    placed
}

fn host_device(capacity: usize) -> Arc<HostDevice> {
    Arc::new(
        HostDevice::new(HostConfig {
            capacity,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    )
}

#[test]
fn a_synthetic_sdxl_checkpoint_is_placed_and_reads_back_exactly() {
    let scratch = Scratch::new("place-sdxl");
    let path = scratch.join("sdxl.safetensors");
    let opts = PresetOptions {
        scale: 16,
        dtype: Dtype::F16,
        text_encoders: true,
        vae: true,
    };
    let specs = preset_specs(Preset::Sdxl, &opts);
    write_deterministic(&path, &specs, &BTreeMap::new(), 42).unwrap();
    let model = Model::open(&path).unwrap();
    let spec_by_name: BTreeMap<_, _> = specs.iter().map(|s| (s.name.clone(), s)).collect();

    let dev = host_device(1 << 30);
    let arena = Arena::new(dev.clone(), ArenaConfig::default()).unwrap();
    let placed = place(&model, &arena);
    let layers: usize = model.layout.components.iter().map(|c| c.layers.len()).sum();
    assert_eq!(placed.len(), layers);

    // Every tensor reads back exactly as written.
    let mut checked = 0usize;
    let mut i = 0;
    for comp in &model.layout.components {
        for layer in &comp.layers {
            let p = &placed[i].1;
            i += 1;
            for (t, &off) in layer.tensors.iter().zip(&p.offsets) {
                let mut back = vec![0u8; t.len as usize];
                arena.read(p.id, off, &mut back).unwrap();
                let expect = deterministic_bytes(42, spec_by_name[&t.name]);
                assert!(back == expect, "tensor {} differs after placement", t.name);
                checked += back.len();
            }
        }
    }
    assert_eq!(checked as u64, model.layout.bytes());

    // The arena's accounting, exactly as the layout implies: each layer is
    // one allocation of its packed size; at a quarter page or more it takes
    // whole pages (the tail of its last page is waste), below that it gets a
    // slab slot of the next power of two, at least 256 bytes.
    let mut by_tag: BTreeMap<Tag, TagUsage> = BTreeMap::new();
    let mut slots_per_class: BTreeMap<usize, usize> = BTreeMap::new();
    let (mut tail_waste, mut slot_bytes, mut page_layers, mut page_pages) = (0, 0, 0, 0);
    for (ci, comp) in model.layout.components.iter().enumerate() {
        for layer in &comp.layers {
            let sizes: Vec<usize> = layer.tensors.iter().map(|t| t.len as usize).collect();
            let total = pack(&sizes).unwrap().total;
            let usage = by_tag.entry(Tag(ci as u32)).or_default();
            usage.allocations += 1;
            usage.bytes += total;
            if total >= PAGE / 4 {
                let pages = total.div_ceil(PAGE);
                usage.pages += pages;
                tail_waste += pages * PAGE - total;
                page_layers += 1;
                page_pages += pages;
            } else {
                let class = total.next_power_of_two().max(256);
                usage.slab_bytes += class;
                slot_bytes += total;
                *slots_per_class.entry(class).or_default() += 1;
            }
        }
    }
    // Placed one after another with no frees, each slot size fills its slab pages in turn.
    let slab_pages: usize = slots_per_class
        .iter()
        .map(|(&class, &n)| n.div_ceil(PAGE / class))
        .sum();
    assert!(
        page_layers > 0 && page_layers < layers,
        "the model exercises both page allocations and the slab"
    );
    let stats = arena.stats();
    assert_eq!(stats.tail_waste, tail_waste, "page-tail waste");
    assert!(
        tail_waste < page_layers * PAGE,
        "at most one page per layer"
    );
    assert_eq!(stats.slab_pages, slab_pages);
    assert_eq!(stats.slab_waste, slab_pages * PAGE - slot_bytes);
    assert_eq!(stats.by_tag, by_tag);
    assert_eq!(stats.pages_used, page_pages + slab_pages);
    assert_eq!(
        stats.bytes_live as u64,
        placed
            .iter()
            .map(|(_, p)| arena.size(p.id).unwrap() as u64)
            .sum::<u64>()
    );
    assert_eq!(dev.counters().pages_mapped, stats.pages_used);
    let per_component: usize = stats.by_tag.values().map(|u| u.allocations).sum();
    assert_eq!(per_component, layers);

    for (_, p) in placed {
        arena.free(p.id).unwrap();
    }
    assert_eq!(arena.stats().pages_used, 0);
    assert_eq!(dev.counters().pages_mapped, 0);
}

#[test]
fn a_real_vae_decoder_is_placed_and_reads_back_exactly() {
    let path = shared_data("model/taesd_decoder.safetensors");
    let model = Model::open(&path).unwrap();
    let dev = host_device(64 << 20);
    let arena = Arena::new(dev.clone(), ArenaConfig::default()).unwrap();
    let placed = place(&model, &arena);
    let mut n = 0;
    let mut i = 0;
    for comp in &model.layout.components {
        for layer in &comp.layers {
            let p = &placed[i].1;
            i += 1;
            for (t, &off) in layer.tensors.iter().zip(&p.offsets) {
                let mut back = vec![0u8; t.len as usize];
                arena.read(p.id, off, &mut back).unwrap();
                let mut expect = vec![0u8; t.len as usize];
                model.read_tensor_into(t, &mut expect).unwrap();
                assert!(back == expect, "tensor {}", t.name);
                n += 1;
            }
        }
    }
    assert_eq!(n, 67, "taesd_decoder holds 67 tensors");
    drop(arena);
    assert_eq!(
        dev.counters().pages_allocated,
        0,
        "dropping the arena returns every page"
    );
}

#[test]
fn a_model_larger_than_the_arena_fails_cleanly_with_the_numbers() {
    let path = shared_data("model/taesdxl_decoder.safetensors");
    let model = Model::open(&path).unwrap();
    let dev = host_device(16 * PAGE);
    let arena = Arena::new(dev.clone(), ArenaConfig::default()).unwrap();
    let mut held = Vec::new();
    let mut failure = None;
    'outer: for comp in &model.layout.components {
        for layer in &comp.layers {
            let sizes: Vec<usize> = layer.tensors.iter().map(|t| t.len as usize).collect();
            match arena.alloc_packed(&sizes, Tag(0)) {
                Ok((id, _)) => held.push(id),
                Err(e) => {
                    failure = Some(e);
                    break 'outer;
                }
            }
        }
    }
    let e = failure.expect("2.4 MB of weights cannot fit in 1 MiB");
    let before = arena.stats();
    assert!(e.is_retryable_oom(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("requested") && msg.contains("free"), "{msg}");
    assert_eq!(arena.stats(), before);
    for id in held {
        arena.free(id).unwrap();
    }
    assert_eq!(dev.counters().pages_mapped, 0);
}
