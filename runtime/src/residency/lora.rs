//! Applying a LoRA set to a loaded model, in each [`LoraMode`].
//!
//! [`Shared::set_loras`] validates the whole set before it changes
//! anything (multipliers, targets, factor bytes and shapes through
//! [`MergeOp::validate`], the mode against the host policy, the device
//! budget), then:
//!
//! - **fuse-on-upload / unfused**: puts the factors on the device (one
//!   allocation per LoRA file, kept while the file stays in the set, so a
//!   multiplier change moves no factor byte), installs the per-layer merges
//!   that every upload runs (or that guards hand out), and re-derives the
//!   device copies of exactly the tensors whose adapters changed: their
//!   pristine bytes are copied again from the host copy and merged with the
//!   new set, on the copy stream, before the layer's ready event is
//!   recorded again. Untouched tensors are not moved. Without a host copy
//!   (staged policy) the changed layers' device copies are dropped instead
//!   and derived at their next upload.
//! - **backup / fuse**: merges on the CPU into the host copy of each changed
//!   tensor, starting from its pristine bytes (kept on the host in backup
//!   mode, re-read from the checkpoint in fuse mode), then re-uploads the
//!   changed tensors of layers that are on the device.
//!
//! A weight is never restored by subtracting a delta: it is always
//! re-derived from pristine bytes, so removing every LoRA leaves each
//! weight bit-identical to the file. What each tensor carries is recorded
//! per tensor ([`LoraState::applied`]), so a call that fails half-way (a
//! checkpoint that changed on disk in fuse mode, a device failure) leaves
//! every tensor consistent with one set and the next call finishes the job.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::component::{CompState, Place};
use super::stats::Counters;
use super::{ModelRt, Shared};
use crate::arena::{pack, AllocId, Tag};
use crate::device::{
    Device, DevicePtr, Kernel, KernelFamily, MergeAdapter, MergeDelta, MergeFactor, MergeKron,
    MergeOp, PinnedBuffer, StreamId,
};
use crate::error::{Error, Result};
use crate::lora::{LoraBinding, LoraDesc, LoraMode, LoraReport, LoraSource, PatchDelta, PatchKron};

/// (component, layer, tensor).
type TensorKey = (usize, usize, usize);

/// One adapter a tensor carries: which LoRA (its description and source,
/// held so that their addresses cannot be reused while recorded), the
/// multiplier's bits and the patch index.
#[derive(Clone)]
struct SigItem {
    desc: Arc<LoraDesc>,
    source: Arc<dyn LoraSource>,
    multiplier: u32,
    patch: usize,
}

impl PartialEq for SigItem {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.desc, &o.desc)
            && std::ptr::addr_eq(Arc::as_ptr(&self.source), Arc::as_ptr(&o.source))
            && self.multiplier == o.multiplier
            && self.patch == o.patch
    }
}

/// What a tensor carries: its adapters in order.
type Sig = Vec<SigItem>;

/// A LoRA file's factors, read once and (in the device modes) uploaded once.
pub(crate) struct LoadedLora {
    desc: Arc<LoraDesc>,
    source: Arc<dyn LoraSource>,
    /// Host bytes of each factor the model uses (`None`: unused).
    host: Vec<Option<Arc<[u8]>>>,
    host_bytes: usize,
    /// The device copy: allocation, base address, offset of each factor.
    dev: Option<(AllocId, DevicePtr, Vec<usize>)>,
    pages: usize,
}

impl LoadedLora {
    fn same(&self, b: &LoraBinding) -> bool {
        Arc::ptr_eq(&self.desc, &b.desc) && Arc::ptr_eq(&self.source, &b.source)
    }

    fn factor(&self, i: usize) -> MergeFactor {
        let f = &self.desc.factors[i];
        let (rows, cols) = f.matrix().unwrap_or((0, 0));
        let host = self.host[i].clone().unwrap_or_else(|| Arc::from(&[][..]));
        let ptr = match &self.dev {
            Some((_, base, offs)) => base.offset(offs[i]),
            None => DevicePtr(0),
        };
        MergeFactor {
            ptr,
            host,
            dtype: f.dtype.kernel().unwrap_or(offload_kernels::Dtype::F32),
            rows,
            cols,
        }
    }

    fn delta(&self, d: &PatchDelta) -> MergeDelta {
        let kron = |k: &PatchKron| match *k {
            PatchKron::Full(m) => MergeKron::Full(self.factor(m)),
            PatchKron::LowRank { a, b } => MergeKron::LowRank {
                a: self.factor(a),
                b: self.factor(b),
            },
        };
        match *d {
            PatchDelta::LowRank { up, down } => MergeDelta::LowRank {
                up: self.factor(up),
                down: self.factor(down),
            },
            PatchDelta::LoHa { w1a, w1b, w2a, w2b } => MergeDelta::LoHa {
                w1a: self.factor(w1a),
                w1b: self.factor(w1b),
                w2a: self.factor(w2a),
                w2b: self.factor(w2b),
            },
            PatchDelta::LoKr { w1, w2 } => MergeDelta::LoKr {
                w1: kron(&w1),
                w2: kron(&w2),
            },
        }
    }
}

/// The LoRA set of one model.
#[derive(Default)]
pub(crate) struct LoraState {
    pub(crate) bindings: Vec<LoraBinding>,
    loaded: Vec<LoadedLora>,
    /// What each tensor carries now (absent: nothing), on the device
    /// (fuse-on-upload) or in the host copy (backup, fuse).
    applied: BTreeMap<TensorKey, Sig>,
    /// Backup mode: the pristine host copy of each layer that carries a LoRA.
    backup: BTreeMap<(usize, usize), PinnedBuffer>,
    /// The mode `applied` was made in.
    mode: LoraMode,
    /// LoRAs out of the set whose device factors an upload job still
    /// queueing may read (its merges were built before the change), or
    /// that could not be freed because such a job kept the copy stream
    /// from being synchronised: freed by a later `set_loras` or unload,
    /// and counted as device memory until then.
    parked: Vec<LoadedLora>,
}

/// Components of a model marked as having their LoRA set changed; unmarked on drop.
struct Swapping<'a>(&'a ModelRt);

impl<'a> Swapping<'a> {
    fn mark(model: &'a ModelRt) -> Result<Self> {
        let marked = Swapping(model);
        for c in &model.comps {
            let mut st = c.lock();
            let in_use = st.layers.iter().filter(|l| l.users > 0).count();
            if in_use > 0 {
                return Err(Error::AllInUse {
                    component: c.name.clone(),
                    in_use,
                });
            }
            st.swapping = true;
        }
        Ok(marked)
    }
}

impl Drop for Swapping<'_> {
    fn drop(&mut self) {
        for c in &self.0.comps {
            c.lock().swapping = false;
        }
    }
}

/// The validated plan of one call, before anything changes.
struct Prepared {
    /// Per tensor: its new signature and adapters as (binding, patch).
    tensors: BTreeMap<TensorKey, (Sig, Vec<(usize, usize)>)>,
    /// Per binding: the factor indices the model uses.
    used: Vec<BTreeSet<usize>>,
}

/// Queue `merges` (each a tensor's offset in the allocation at `dst`, and
/// its merge) on `stream` as one [`Kernel::MergeBatch`], and count them per
/// tensor in `merges` and `merged_bytes` once it is queued (nothing is
/// counted when the launch fails; nothing is queued for no merge).
pub(super) fn launch_merge_batch(
    device: &dyn Device,
    counters: &Counters,
    merges: &[(usize, Arc<MergeOp>)],
    dst: DevicePtr,
    stream: StreamId,
) -> Result<()> {
    launch_uncounted(device, merges, dst, stream)?;
    count_merges(counters, merges);
    Ok(())
}

/// [`launch_merge_batch`] without counting (the uploader's jobs are
/// counted when they are handed over).
pub(super) fn launch_uncounted(
    device: &dyn Device,
    merges: &[(usize, Arc<MergeOp>)],
    dst: DevicePtr,
    stream: StreamId,
) -> Result<()> {
    if merges.is_empty() {
        return Ok(());
    }
    device.launch(
        &Kernel::MergeBatch {
            base: dst,
            ops: merges.into(),
        },
        stream,
    )
}

/// Count `merges` in `merges` and `merged_bytes`.
pub(super) fn count_merges(counters: &Counters, merges: &[(usize, Arc<MergeOp>)]) {
    Counters::add(&counters.merges, merges.len() as u64);
    let bytes: usize = merges.iter().map(|(_, op)| op.touched_bytes()).sum();
    Counters::add(&counters.merged_bytes, bytes as u64);
}

impl Shared {
    /// Queue the merges of a layer uploaded to `dst` on `stream`: one
    /// [`Kernel::MergeBatch`] (which the CUDA backend runs in as few
    /// launches as it can), counted per tensor in `merges` and
    /// `merged_bytes` once it is queued.
    pub(super) fn launch_merges(
        &self,
        merges: &[(usize, Arc<MergeOp>)],
        dst: DevicePtr,
        stream: StreamId,
    ) -> Result<()> {
        launch_merge_batch(&*self.device, &self.counters, merges, dst, stream)
    }

    /// Check a set against a model for a mode without applying it.
    pub(super) fn check_lora_set(
        &self,
        model: &ModelRt,
        bindings: &[LoraBinding],
        mode: LoraMode,
    ) -> Result<()> {
        self.ready(model, bindings, mode).map(|_| ())
    }

    /// [`Self::prepare`], then, in fuse-on-upload when the set patches some
    /// tensor, has the device build its merge kernels: on CUDA, NVRTC takes
    /// seconds when the kernel disk cache does not hold them, which belongs
    /// here rather than in the first upload's job (a pass would wait for it,
    /// up to its `wait_timeout`), and a device that cannot merge is an error
    /// before anything changes.
    fn ready(&self, model: &ModelRt, bindings: &[LoraBinding], mode: LoraMode) -> Result<Prepared> {
        let prep = self.prepare(model, bindings, mode)?;
        if mode == LoraMode::FuseOnUpload && !prep.tensors.is_empty() {
            self.device.prepare(KernelFamily::Merge)?;
        }
        Ok(prep)
    }

    /// Check every binding against the model; nothing changes.
    fn prepare(
        &self,
        model: &ModelRt,
        bindings: &[LoraBinding],
        mode: LoraMode,
    ) -> Result<Prepared> {
        let err = |b: &LoraBinding, message: String| Error::Lora {
            lora: b.desc.name.clone(),
            message,
        };
        if mode.fuses_host_copy() && self.stager.is_some() {
            if let Some(b) = bindings.first() {
                return Err(err(
                    b,
                    format!(
                        "LoRA mode {mode} fuses into the host copy and needs the pinned host policy; this runtime stages weights from the file ({})",
                        self.cfg.host_policy
                    ),
                ));
            }
        }
        let mut tensors: BTreeMap<TensorKey, (Sig, Vec<(usize, usize)>)> = BTreeMap::new();
        let mut used = vec![BTreeSet::new(); bindings.len()];
        for (bi, b) in bindings.iter().enumerate() {
            if !b.multiplier.is_finite() {
                return Err(err(b, format!("multiplier {} is not finite", b.multiplier)));
            }
            if bindings[..bi]
                .iter()
                .any(|o| Arc::ptr_eq(&o.desc, &b.desc) && Arc::ptr_eq(&o.source, &b.source))
            {
                return Err(err(b, "is in the set twice; give it one multiplier".into()));
            }
            for (fi, f) in b.desc.factors.iter().enumerate() {
                if f.dtype.kernel().is_none() || f.bytes().is_none() {
                    return Err(err(
                        b,
                        format!(
                            "factor {} is {} {:?}: factors must be f32, f16 or bf16 of a size that fits in memory",
                            f.name, f.dtype, f.shape
                        ),
                    ));
                }
                let _ = fi;
            }
            for (pi, p) in b.desc.patches.iter().enumerate() {
                let target = model
                    .desc
                    .components
                    .get(p.component)
                    .and_then(|c| c.layers.get(p.layer))
                    .and_then(|l| l.tensors.get(p.tensor));
                let Some(t) = target else {
                    return Err(err(
                        b,
                        format!(
                            "module {} targets tensor {}/{}/{}, which model {} does not have",
                            p.key, p.component, p.layer, p.tensor, model.desc.name
                        ),
                    ));
                };
                if t.dtype.kernel().is_none() {
                    return Err(err(
                        b,
                        format!(
                            "module {} targets {} of type {}: only f32, f16 and bf16 weights take a LoRA",
                            p.key, t.name, t.dtype
                        ),
                    ));
                }
                if !(p.scale.is_finite() && (p.scale * b.multiplier).is_finite()) {
                    return Err(err(
                        b,
                        format!(
                            "module {}: scale {} × multiplier {} is not finite",
                            p.key, p.scale, b.multiplier
                        ),
                    ));
                }
                let factors = p.delta.factors();
                if let Some(&bad) = factors.iter().find(|&&f| f >= b.desc.factors.len()) {
                    return Err(err(
                        b,
                        format!(
                            "module {} uses factor {bad}; the LoRA has {}",
                            p.key,
                            b.desc.factors.len()
                        ),
                    ));
                }
                if mode == LoraMode::Unfused && !matches!(p.delta, PatchDelta::LowRank { .. }) {
                    return Err(err(
                        b,
                        format!(
                            "module {} is LoHa or LoKr; the unfused mode hands the engine low-rank factors only (use fuse-on-upload)",
                            p.key
                        ),
                    ));
                }
                used[bi].extend(factors);
                let e = tensors.entry((p.component, p.layer, p.tensor)).or_default();
                e.0.push(SigItem {
                    desc: b.desc.clone(),
                    source: b.source.clone(),
                    multiplier: b.multiplier.to_bits(),
                    patch: pi,
                });
                e.1.push((bi, pi));
            }
        }
        Ok(Prepared { tensors, used })
    }

    /// The merges of one tensor (one per distinct row slice, in first-use order).
    fn tensor_ops(
        model: &ModelRt,
        key: TensorKey,
        adapters: &[(usize, usize)],
        bindings: &[LoraBinding],
        loaded: &[&LoadedLora],
    ) -> Result<Vec<Arc<MergeOp>>> {
        let t = &model.desc.components[key.0].layers[key.1].tensors[key.2];
        let dtype = t.dtype.kernel().unwrap_or(offload_kernels::Dtype::F32);
        let mut groups: Vec<MergeOp> = Vec::new();
        for &(bi, pi) in adapters {
            let b = &bindings[bi];
            let p = &b.desc.patches[pi];
            let adapter = MergeAdapter {
                scale: p.scale * b.multiplier,
                delta: loaded[bi].delta(&p.delta),
            };
            match groups.iter_mut().find(|g| g.rows == p.rows) {
                Some(g) => g.adapters.push(adapter),
                None => groups.push(MergeOp {
                    dtype,
                    shape: t.shape.clone(),
                    rows: p.rows.clone(),
                    adapters: vec![adapter],
                }),
            }
        }
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            g.validate().map_err(|e| {
                let names: Vec<&str> = adapters
                    .iter()
                    .map(|&(bi, pi)| bindings[bi].desc.patches[pi].key.as_str())
                    .collect();
                Error::Lora {
                    lora: adapters
                        .iter()
                        .map(|&(bi, _)| bindings[bi].desc.name.as_str())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>()
                        .join(", "),
                    message: format!(
                        "modules {names:?} do not fit tensor {} ({} {:?}, rows {:?}): {e}",
                        t.name, t.dtype, t.shape, g.rows
                    ),
                }
            })?;
            out.push(Arc::new(g));
        }
        Ok(out)
    }

    /// Read the factors a binding uses (reusing an already loaded copy).
    fn read_factors(&self, b: &LoraBinding, used: &BTreeSet<usize>) -> Result<LoadedLora> {
        let mut host = vec![None; b.desc.factors.len()];
        let mut host_bytes = 0;
        for &fi in used {
            let f = &b.desc.factors[fi];
            let n = f.bytes().unwrap_or(0);
            let mut buf = vec![0u8; n];
            b.source.read(fi, &mut buf).map_err(|e| Error::Lora {
                lora: b.desc.name.clone(),
                message: format!("reading factor {}: {e}", f.name),
            })?;
            host_bytes += n;
            host[fi] = Some(Arc::from(buf));
        }
        Ok(LoadedLora {
            desc: b.desc.clone(),
            source: b.source.clone(),
            host,
            host_bytes,
            dev: None,
            pages: 0,
        })
    }

    /// Pages a LoRA's factors take on the device.
    fn factor_layout(&self, l: &LoadedLora) -> Result<(Vec<usize>, usize)> {
        let sizes: Vec<usize> = l
            .host
            .iter()
            .map(|h| h.as_ref().map_or(0, |b| b.len()))
            .collect();
        let p = pack(&sizes).ok_or_else(|| Error::Lora {
            lora: l.desc.name.clone(),
            message: "factors too large to address".into(),
        })?;
        Ok((p.offsets, p.total))
    }

    /// Put a LoRA's factors on the device (queued on the copy stream). When
    /// a copy cannot be queued the LoRA holds the allocation all the same
    /// (the copies queued before it still write there): `discard` it.
    fn upload_factors(&self, model: &ModelRt, l: &mut LoadedLora) -> Result<()> {
        let (offsets, total) = self.factor_layout(l)?;
        if total == 0 {
            return Ok(());
        }
        let tag = Tag(0x8000_0000 | model.id.0);
        // Make room and retry: other threads may take what was freed.
        let mut tries = 0;
        let a = loop {
            match self.arena.alloc(total, tag) {
                Ok(a) => break a,
                Err(e) if e.is_retryable_oom() && tries < 3 => {
                    tries += 1;
                    self.make_room(total.div_ceil(self.page), None)?;
                }
                Err(e) => return Err(e),
            }
        };
        let base = match self.arena.ptr(a) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.arena.free(a);
                return Err(e);
            }
        };
        for (i, h) in l.host.iter().enumerate() {
            if let Some(h) = h {
                // SAFETY: the bytes live in `l.host` (an Arc kept by the
                // loaded LoRA and every merge that uses it) until the LoRA
                // is dropped (`drop_loaded`), which happens only after
                // synchronising the copy stream: a LoRA that cannot be
                // synchronised is parked whole, host bytes included.
                let r = unsafe {
                    self.device.copy_h2d_async(
                        base.offset(offsets[i]),
                        h.as_ptr(),
                        h.len(),
                        self.copy,
                    )
                };
                if let Err(e) = r {
                    // The copies queued so far read `l.host` and write the
                    // allocation: the LoRA carries it, and the caller's
                    // `discard` frees both behind a synchronisation (or
                    // parks them while a job holds the stream).
                    l.pages = total.div_ceil(self.page);
                    l.dev = Some((a, base, offsets));
                    self.lora_pages.fetch_add(l.pages, Ordering::Relaxed);
                    return Err(e);
                }
                Counters::add(&self.counters.bytes_h2d, h.len() as u64);
            }
        }
        l.pages = total.div_ceil(self.page);
        l.dev = Some((a, base, offsets));
        self.lora_pages.fetch_add(l.pages, Ordering::Relaxed);
        Ok(())
    }

    /// Free a LoRA's device copy (after the copy stream and the engine's
    /// work queued so far) and its host bytes.
    ///
    /// `synced`: the caller synchronised the copy stream with no job of the
    /// model still queueing (unload). Otherwise a job still queueing after
    /// `wait_timeout` keeps the stream from being synchronised, and the
    /// LoRA is given back untouched (its factors may still be read).
    fn drop_loaded(&self, l: LoadedLora, synced: bool) -> std::result::Result<(), LoadedLora> {
        if let Some((a, _, _)) = l.dev {
            if !synced && matches!(self.sync_copy(), Err(Error::UploadsStuck { .. })) {
                return Err(l);
            }
            let freed = self
                .event()
                .and_then(|e| {
                    self.device.record_event(e, self.compute)?;
                    Ok(e)
                })
                .and_then(|e| {
                    let r = self.arena.free_after(a, e);
                    self.recycle(e);
                    r
                });
            if freed.is_err() {
                let _ = self.device.stream_synchronize(self.compute);
                let _ = self.arena.free(a);
            }
            self.lora_pages.fetch_sub(l.pages, Ordering::Relaxed);
        }
        self.counters.host_free(l.host_bytes);
        Ok(())
    }

    /// Free LoRAs that left `model`'s set, or park them in `state` while
    /// one of the model's upload jobs is still queueing after
    /// `wait_timeout`: its merges were built before the change and may
    /// read their factors.
    fn retire(&self, model: &ModelRt, state: &mut LoraState, gone: Vec<LoadedLora>) {
        let pending = gone.iter().any(|l| l.dev.is_some()) && {
            let jobs: Vec<_> = model
                .comps
                .iter()
                .flat_map(|c| {
                    c.lock()
                        .layers
                        .iter()
                        .filter_map(|x| x.job.clone())
                        .collect::<Vec<_>>()
                })
                .collect();
            // A job in flight (a prefetch) is over in moments; one still
            // queueing after the wait may be stuck for good.
            jobs.iter().any(|j| {
                let _ = j.wait(self.cfg.wait_timeout);
                !j.is_finished()
            })
        };
        for l in gone {
            if pending && l.dev.is_some() {
                state.parked.push(l);
            } else {
                self.discard(state, l);
            }
        }
    }

    /// Free a LoRA no upload job's merges use (loaded by this call and
    /// never applied), parking it only if a job still queueing keeps the
    /// copy stream from being synchronised.
    fn discard(&self, state: &mut LoraState, l: LoadedLora) {
        if let Err(l) = self.drop_loaded(l, false) {
            state.parked.push(l);
        }
    }

    /// Check that the set's factors fit beside what each component needs at
    /// the least (all of it when resident, one ring slot when streamed).
    fn check_budget(&self, model: &ModelRt, new_pages: usize, old_pages: usize) -> Result<()> {
        let capacity = self.arena.capacity() / self.page;
        let others = self
            .lora_pages
            .load(Ordering::Relaxed)
            .saturating_sub(old_pages);
        use super::Mode;
        use crate::model::Pin;
        // What must be on the device at once: components resident in every
        // case, plus the largest single need of the others (a whole
        // component in model mode, a ring slot for its largest layer when streamed).
        let mut need = new_pages + others;
        let mut largest = 0usize;
        for m in self.models.iter() {
            for c in &m.comps {
                let fixed = c.pin == Pin::AlwaysResident
                    || (self.res.mode == Mode::None && c.pin != Pin::NeverResident);
                if fixed {
                    need += c.pages_total();
                } else if self.res.mode == Mode::Model && c.pin != Pin::NeverResident {
                    largest = largest.max(c.pages_total());
                } else {
                    largest = largest.max(c.layer_pages.iter().copied().max().unwrap_or(0));
                }
            }
        }
        need += largest;
        if need > capacity {
            return Err(Error::DoesNotFit {
                what: format!(
                    "the LoRA set of model {} ({} bytes of factors on the device) beside the layers that must be on the device",
                    model.desc.name,
                    new_pages * self.page
                ),
                needed: need * self.page,
                available: capacity * self.page,
                mode: self.res.mode.to_string(),
            });
        }
        Ok(())
    }

    /// Apply `bindings` to `model` in `mode`; see the module documentation.
    pub(super) fn set_loras(
        &self,
        model: &Arc<ModelRt>,
        bindings: &[LoraBinding],
        mode: LoraMode,
    ) -> Result<LoraReport> {
        let t0 = Instant::now();
        // Before the model's lock: building the merge kernels may take
        // seconds, and the checks need no LoRA state.
        let prep = self.ready(model, bindings, mode)?;
        let mut state = model.lora.lock().unwrap_or_else(|p| p.into_inner());
        let parked = std::mem::take(&mut state.parked);
        self.retire(model, &mut state, parked);
        if state.mode != mode && !state.applied.is_empty() {
            // Take the old set off in its own mode first.
            let old = state.mode;
            drop(state);
            self.set_loras(model, &[], old)?;
            state = model.lora.lock().unwrap_or_else(|p| p.into_inner());
        }
        let device_mode = matches!(mode, LoraMode::FuseOnUpload | LoraMode::Unfused);
        // Nobody may hold a layer of the model while its weights change:
        // check, and mark every component so that acquires wait until the
        // call ends (the mark goes on every return path).
        let _swap = Swapping::mark(model)?;
        // Factors: reuse what is loaded, read the rest (nothing changes yet).
        let mut fresh: Vec<Option<LoadedLora>> = Vec::with_capacity(bindings.len());
        let mut reused = vec![false; bindings.len()];
        for (bi, b) in bindings.iter().enumerate() {
            // A loaded copy serves if it has every factor now used, on the
            // device exactly when the mode needs them there.
            let reuse = state.loaded.iter().any(|l| {
                l.same(b)
                    && prep.used[bi].iter().all(|&f| l.host[f].is_some())
                    && (l.dev.is_some() == device_mode || l.host_bytes == 0)
            });
            reused[bi] = reuse;
            fresh.push(if reuse {
                None
            } else {
                Some(self.read_factors(b, &prep.used[bi])?)
            });
        }
        // Validate every merge against its tensor with the real bytes.
        {
            let kept_now =
                |l: &LoadedLora| bindings.iter().zip(&reused).any(|(b, &r)| r && l.same(b));
            let loaded: Vec<&LoadedLora> = bindings
                .iter()
                .zip(&fresh)
                .map(|(b, f)| match f {
                    Some(l) => l,
                    None => state
                        .loaded
                        .iter()
                        .find(|l| l.same(b) && kept_now(l))
                        .expect("a reused LoRA is loaded"),
                })
                .collect();
            for (&key, (_, adapters)) in &prep.tensors {
                Self::tensor_ops(model, key, adapters, bindings, &loaded)?;
            }
        }
        // The device budget, then the device copies of new factors.
        let kept = |l: &LoadedLora| bindings.iter().zip(&reused).any(|(b, &r)| r && l.same(b));
        let reused_pages: usize = state
            .loaded
            .iter()
            .filter(|l| kept(l))
            .map(|l| l.pages)
            .sum();
        let mut new_pages = reused_pages;
        if device_mode {
            for l in fresh.iter().flatten() {
                new_pages += self.factor_layout(l)?.1.div_ceil(self.page);
            }
        }
        let old_pages: usize = state.loaded.iter().map(|l| l.pages).sum();
        if device_mode {
            self.check_budget(model, new_pages, old_pages)?;
        }
        // Loaded copies that no binding reuses go once the new merges are in place.
        let (keep, gone): (Vec<LoadedLora>, Vec<LoadedLora>) = std::mem::take(&mut state.loaded)
            .into_iter()
            .partition(|l| kept(l));
        // A failure left on the copy stream by an earlier upload belongs to
        // that upload's ready event (an acquire or `apply` handles it), not
        // to this call: clear it before queueing ours. A job stuck queueing
        // ends the call here, before anything is uploaded.
        if let Err(e @ Error::UploadsStuck { .. }) = self.sync_copy() {
            state.loaded = keep;
            state.loaded.extend(gone);
            return Err(e);
        }
        let mut loaded_new: Vec<LoadedLora> = Vec::new();
        let mut upload_err = None;
        for l in fresh.into_iter().flatten() {
            let mut l = l;
            self.counters.host_alloc(l.host_bytes);
            if device_mode {
                if let Err(e) = self.upload_factors(model, &mut l) {
                    upload_err = Some(e);
                    self.discard(&mut state, l);
                    break;
                }
            }
            loaded_new.push(l);
        }
        if let Some(e) = upload_err.or_else(|| self.sync_copy().err()) {
            for l in loaded_new {
                self.discard(&mut state, l);
            }
            state.loaded = keep;
            state.loaded.extend(gone);
            return Err(e);
        }
        // The new merges of every patched tensor (validated above already;
        // should it fail now, only the new factors are given back).
        let built = {
            let loaded: Vec<&LoadedLora> = bindings
                .iter()
                .map(|b| {
                    keep.iter()
                        .chain(&loaded_new)
                        .find(|l| l.same(b))
                        .expect("every binding is loaded")
                })
                .collect();
            prep.tensors
                .iter()
                .map(|(&key, (_, adapters))| {
                    Self::tensor_ops(model, key, adapters, bindings, &loaded).map(|v| (key, v))
                })
                .collect::<Result<BTreeMap<TensorKey, Vec<Arc<MergeOp>>>>>()
        };
        let ops = match built {
            Ok(ops) => ops,
            Err(e) => {
                for l in loaded_new {
                    self.discard(&mut state, l);
                }
                state.loaded = keep;
                state.loaded.extend(gone);
                return Err(e);
            }
        };
        let mut all: Vec<LoadedLora> = keep;
        all.extend(loaded_new);
        let mut report = LoraReport::default();
        let result = self.apply(model, &mut state, &prep, &ops, mode, &mut report);
        // Factors of LoRAs that left the set: their merges were replaced
        // under each component's lock, but a job still queueing after the
        // wait (an error above) holds the old ones: then they are parked.
        self.retire(model, &mut state, gone);
        state.loaded = all;
        if mode.fuses_host_copy() && result.is_ok() {
            // The factors live on in the fused host copy: their own bytes
            // are not kept (a later change reads them again), so host
            // memory is the model's (plus backups in backup mode).
            for l in &mut state.loaded {
                self.counters.host_free(l.host_bytes);
                l.host_bytes = 0;
                l.host.iter_mut().for_each(|h| *h = None);
            }
        }
        state.bindings = bindings.to_vec();
        state.mode = mode;
        self.replan_squeezed();
        report.tensors_patched = prep.tensors.len();
        report.factor_pages = state.loaded.iter().map(|l| l.pages).sum();
        report.factor_bytes = state
            .loaded
            .iter()
            .filter(|l| l.dev.is_some())
            .map(|l| l.host_bytes)
            .sum();
        report.seconds = t0.elapsed().as_secs_f64();
        result.map(|()| report)
    }

    /// Components whose plan no longer fits beside the LoRA factors plan again at their next acquire.
    fn replan_squeezed(&self) {
        let lora = self.lora_pages.load(Ordering::Relaxed);
        let capacity = (self.arena.capacity() / self.page).saturating_sub(lora);
        for m in self.models.iter() {
            for c in &m.comps {
                let mut st = c.lock();
                if st.started && !st.all_resident && st.pages > capacity {
                    let _ = self.offload_locked(c, &mut st, true);
                }
            }
        }
    }

    /// Change the weights of every tensor whose adapters changed, component by component.
    fn apply(
        &self,
        model: &Arc<ModelRt>,
        state: &mut LoraState,
        prep: &Prepared,
        ops: &BTreeMap<TensorKey, Vec<Arc<MergeOp>>>,
        mode: LoraMode,
        report: &mut LoraReport,
    ) -> Result<()> {
        // Tensors whose content must change: their signature differs, or the
        // mode changed the place where the merge lives.
        let mode_changed = state.mode != mode && !state.applied.is_empty();
        let host_was_fused = state.mode.fuses_host_copy() && !state.applied.is_empty();
        let mut changed: BTreeSet<TensorKey> = BTreeSet::new();
        for (&k, (sig, _)) in &prep.tensors {
            if mode_changed || state.applied.get(&k) != Some(sig) {
                changed.insert(k);
            }
        }
        for k in state.applied.keys() {
            if !prep.tensors.contains_key(k) {
                changed.insert(*k);
            }
        }
        report.tensors_changed = changed.len();
        // A failure left on the copy stream by an earlier upload belongs to
        // that upload's ready event (handled per layer below), not to this call.
        let _ = self.sync_copy();
        let mut first_err: Option<Error> = None;
        for (ci, comp) in model.comps.iter().enumerate() {
            let mut st = comp.lock();
            // The merges uploads run and guards hand out, for every layer.
            for l in 0..st.merges.len() {
                let mut merges = Vec::new();
                let mut unfused = Vec::new();
                for (t, &(_, off, _)) in comp.layer_bytes[l].pieces.iter().enumerate() {
                    for op in ops.get(&(ci, l, t)).into_iter().flatten() {
                        match mode {
                            LoraMode::FuseOnUpload => merges.push((off, op.clone())),
                            LoraMode::Unfused => unfused.push((t, op.clone())),
                            LoraMode::Backup | LoraMode::Fuse => {}
                        }
                    }
                }
                st.merges[l] = merges;
                st.unfused[l] = unfused;
            }
            let layers: BTreeSet<usize> =
                changed.iter().filter(|k| k.0 == ci).map(|k| k.1).collect();
            for l in layers {
                let tensors: Vec<usize> = changed
                    .iter()
                    .filter(|k| k.0 == ci && k.1 == l)
                    .map(|k| k.2)
                    .collect();
                let r = self.change_layer(
                    model,
                    ci,
                    &mut st,
                    l,
                    &tensors,
                    state,
                    prep,
                    ops,
                    (mode, host_was_fused),
                    report,
                );
                if let Err(e) = r {
                    // The layer's device copy may be half-derived: drop it, so the
                    // next upload derives it from the host copy. What was queued
                    // for it must have run first (its pages are freed behind a
                    // ready event recorded before those copies), and a failure it
                    // left on the copy stream is this call's, not the next upload's.
                    let _ = self.sync_copy();
                    if st.layers[l].place != Place::Host && self.drop_device_copy(comp, &mut st, l)
                    {
                        report.layers_dropped += 1;
                    }
                    first_err.get_or_insert(e);
                    if mode.fuses_host_copy() || host_was_fused {
                        // Host copies are changed tensor by tensor; stop here.
                        return Err(first_err.expect("set"));
                    }
                }
            }
        }
        if let Err(e) = self.sync_copy() {
            // A re-derivation failed on the stream: drop every changed copy.
            for (ci, comp) in model.comps.iter().enumerate() {
                let mut st = comp.lock();
                for l in changed
                    .iter()
                    .filter(|k| k.0 == ci)
                    .map(|k| k.1)
                    .collect::<BTreeSet<_>>()
                {
                    if st.layers[l].place != Place::Host && self.drop_device_copy(comp, &mut st, l)
                    {
                        report.layers_dropped += 1;
                    }
                }
            }
            first_err.get_or_insert(e);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Re-derive layer `l`'s changed `tensors`: host copy first (backup,
    /// fuse), then the device copy if there is one.
    #[allow(clippy::too_many_arguments)]
    fn change_layer(
        &self,
        model: &ModelRt,
        ci: usize,
        st: &mut CompState,
        l: usize,
        tensors: &[usize],
        state: &mut LoraState,
        prep: &Prepared,
        ops: &BTreeMap<TensorKey, Vec<Arc<MergeOp>>>,
        (mode, host_was_fused): (LoraMode, bool),
        report: &mut LoraReport,
    ) -> Result<()> {
        let comp = &model.comps[ci];
        // An upload job still being queued (staged, or on the uploader)
        // finishes first (a failed one is over: its copy is dropped below).
        if let Some(j) = st.layers[l].job.clone() {
            let _ = j.wait(self.cfg.wait_timeout);
            if !j.is_finished() {
                return Err(Error::Timeout {
                    event: comp.ready[l],
                    waited_ms: self.cfg.wait_timeout.as_millis() as u64,
                });
            }
        }
        if mode.fuses_host_copy() || host_was_fused {
            // Queued copies read the host copy: let them finish before it changes.
            self.sync_copy()?;
            for &t in tensors {
                self.fuse_host_tensor(model, ci, st, l, t, state, prep, ops, mode, host_was_fused)?;
            }
            report.host_layers_changed += 1;
        }
        if !mode.fuses_host_copy() {
            for &t in tensors {
                match prep.tensors.get(&(ci, l, t)) {
                    Some((sig, _)) => state.applied.insert((ci, l, t), sig.clone()),
                    None => state.applied.remove(&(ci, l, t)),
                };
            }
        }
        if st.layers[l].place == Place::Host {
            return Ok(());
        }
        if mode == LoraMode::Unfused && !host_was_fused {
            // The device copy is pristine already (a set merged on the
            // device was taken off in its own mode first).
            return Ok(());
        }
        let dst = match st.layers[l].place {
            Place::Alloc(_, p) => p,
            Place::Slot(s) => st.ring[s].ptr,
            Place::Host => return Ok(()),
        };
        // A copy whose upload failed holds garbage in its other tensors
        // too; a staged one has no host copy to re-derive from. Either way
        // the next upload derives it whole.
        let failed = matches!(
            self.device.event_query(comp.ready[l]),
            Err(Error::StreamFailed { .. })
        ) || st.layers[l]
            .job
            .as_ref()
            .is_some_and(|j| j.wait(std::time::Duration::ZERO).is_err());
        let host = match st.host[l].as_ref() {
            Some(h) if !failed => h,
            _ => {
                if self.drop_device_copy(comp, st, l) {
                    report.layers_dropped += 1;
                }
                return Ok(());
            }
        };
        // After the engine's last use of the old bytes, and after the merges
        // of its last upload if they ran on the merge stream.
        for &(_, e) in &st.layers[l].done {
            self.device.stream_wait_event(self.copy, e)?;
        }
        if st.layers[l].ready_on_merge {
            self.wait_merged(comp.ready[l])?;
        }
        // The device copy changes from here: the ready event is recorded again below.
        st.layers[l].ready_seen = false;
        // The layer's merges, queued after its copies as one batch.
        let mut merges: Vec<(usize, Arc<MergeOp>)> = Vec::new();
        for &t in tensors {
            let (_, off, len) = comp.layer_bytes[l].pieces[t];
            // SAFETY: the host copy lives in the component state until the
            // model is unloaded, which synchronises the copy stream first;
            // it changes only in backup/fuse mode, after synchronising the
            // copy stream under this component's lock (held here).
            unsafe {
                self.device.copy_h2d_async(
                    dst.offset(off),
                    host.as_ptr().add(off),
                    len,
                    self.copy,
                )?
            };
            Counters::add(&self.counters.bytes_h2d, len as u64);
            if mode == LoraMode::FuseOnUpload {
                merges.extend(
                    ops.get(&(ci, l, t))
                        .into_iter()
                        .flatten()
                        .map(|op| (off, op.clone())),
                );
            }
            report.tensors_rederived += 1;
        }
        self.launch_merges(&merges, dst, self.copy)?;
        self.device.record_event(comp.ready[l], self.copy)?;
        st.layers[l].ready_on_merge = false;
        Ok(())
    }

    /// Backup and fuse modes: make the host copy of tensor `t` its pristine
    /// bytes merged with the new adapters.
    #[allow(clippy::too_many_arguments)]
    fn fuse_host_tensor(
        &self,
        model: &ModelRt,
        ci: usize,
        st: &mut CompState,
        l: usize,
        t: usize,
        state: &mut LoraState,
        prep: &Prepared,
        ops: &BTreeMap<TensorKey, Vec<Arc<MergeOp>>>,
        mode: LoraMode,
        host_was_fused: bool,
    ) -> Result<()> {
        let comp = &model.comps[ci];
        let (_, off, len) = comp.layer_bytes[l].pieces[t];
        let new_ops: &[Arc<MergeOp>] = ops.get(&(ci, l, t)).map_or(&[], |v| v);
        let Some(host) = st.host[l].as_mut() else {
            return Err(Error::Config(
                "backup and fuse modes need the pinned host policy".into(),
            ));
        };
        // The pristine bytes: the backup (taken before the layer was first
        // fused), else the host copy itself when it carries nothing, else the file.
        let mut pristine_from_backup = false;
        if let Some(b) = state.backup.get(&(ci, l)) {
            host.as_mut_slice()[off..off + len].copy_from_slice(&b.as_slice()[off..off + len]);
            pristine_from_backup = true;
        } else if host_was_fused && state.applied.contains_key(&(ci, l, t)) {
            let mut buf = vec![0u8; len];
            model.source.read(ci, l, t, 0, &mut buf)?;
            host.as_mut_slice()[off..off + len].copy_from_slice(&buf);
        }
        state.applied.remove(&(ci, l, t));
        if mode.fuses_host_copy() && !new_ops.is_empty() {
            if mode == LoraMode::Backup && !pristine_from_backup {
                let mut b = self.device.alloc_pinned(host.len())?;
                b.as_mut_slice().copy_from_slice(host.as_slice());
                self.counters.host_alloc(b.len());
                state.backup.insert((ci, l), b);
            }
            let w = &mut host.as_mut_slice()[off..off + len];
            for op in new_ops {
                let adapters = op.adapters_with(&mut |f| &f.host);
                let spec = offload_kernels::MergeSpec::new(
                    op.dtype,
                    &op.shape,
                    op.rows.clone(),
                    &adapters,
                )
                .map_err(|e| Error::Kernel {
                    kernel: "merge",
                    message: e.to_string(),
                })?;
                offload_kernels::merge_cpu(w, &spec, None).map_err(|e| Error::Kernel {
                    kernel: "merge",
                    message: e.to_string(),
                })?;
            }
            if let Some((sig, _)) = prep.tensors.get(&(ci, l, t)) {
                state.applied.insert((ci, l, t), sig.clone());
            }
        }
        // A layer with nothing fused any more needs no backup.
        let layer_clean = !state.applied.keys().any(|k| k.0 == ci && k.1 == l);
        if layer_clean {
            if let Some(b) = state.backup.remove(&(ci, l)) {
                self.counters.host_free(b.len());
            }
        }
        Ok(())
    }

    /// Forget a model's LoRA state when it is unloaded (its components are offloaded).
    pub(super) fn drop_loras(&self, model: &ModelRt) {
        let mut state = model.lora.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = std::mem::take(&mut state.loaded);
        let parked = std::mem::take(&mut state.parked);
        for l in loaded.into_iter().chain(parked) {
            // Unload synchronised the copy stream with no job of the model queueing.
            let _ = self.drop_loaded(l, true);
        }
        for (_, b) in std::mem::take(&mut state.backup) {
            self.counters.host_free(b.len());
        }
        state.applied.clear();
        state.bindings.clear();
    }
}
