"""Teacher-output cache: run the teachers once over a dataset, then distil many times at the speed of the student.

:func:`build_cache` (``vldistill cache``) runs every teacher of a recipe once over the training set and stores what
losses read from a teacher (:class:`~vldistill.outputs.Embeddings`): pooled image and text embeddings, optionally
token features, optionally for K augmented views of each image. A recipe whose teachers say ``source: cache`` then
trains through :class:`CachedTeachers`, a drop-in ``TeacherSource``: no teacher forward in the training step.

Where things are: :mod:`.identity` (teacher identity, the manifest, :class:`CacheError`), :mod:`.fingerprint` (text
fields and the dataset fingerprint), :mod:`.views` (augmented views), :mod:`.build` (build and resume),
:mod:`.extend` (adding a teacher), :mod:`.writer` (computing and writing shards), :mod:`.distributed` (one cache
built by several processes), :mod:`.read`
(:class:`CachedTeachers`), :mod:`.recipe` (a recipe's cache).

A cache is a directory::

    manifest.json               what was cached, from what and how; the complete shards; ``complete: true`` at the end
    shard-00000.safetensors     rows [0, S) of the dataset
    shard-00001.safetensors     rows [S, 2S), ...
    texts-KEY.safetensors       the teachers' embeddings of a recipe's free texts (``data.texts``), when it has any:
                                ``t{k}`` ``[M, d]``, keyed by the teachers and the texts (:mod:`.texts`)

A shard of ``n`` rows holds (``k``: teacher number, ``K``: views, ``field``: a text field the teacher embeds, see
:func:`~vldistill.batching.teacher_texts`: a caption language such as ``en``, or ``question``, ``qa``,
``hypothesis``, ``candidates``, ``rationales``; ``C``: candidates per item)::

    row_key                   [n, 16] uint8   content digest of the sample (see "Dataset fingerprint")
    views                     [n, K, 5] f32   crop box (x0, y0, x1, y1, relative to the image) and flip, K > 1 only
    t{k}.image                [n, K, d]       pooled image embedding of each view
    t{k}.text.{field}         [n, d]          pooled text embedding; [n, C, d] for a candidate field
    t{k}.image_tokens         [n, K, T, h]    token features, with ``cache.tokens`` only
    t{k}.text_tokens.{field}  [n, L, h]       padded with zeros to the teacher's max length L, with ``cache.tokens``,
                                              not for candidate fields (the live teacher gives none for them either)
    t{k}.text_mask.{field}    [n, L] uint8

The manifest (format version 2) lists per teacher the text ``fields`` it embeds, and under ``dataset`` the
``fields`` the row digests cover. For image-text pairs the fields are the caption languages of the recipe
(``data.languages``, ``teachers.N.languages``); for task samples (``vldistill.data.tasks.TaskDataset``) the caller
names them (:func:`dataset_fields`: every field of the first sample). A cache of format 1 (caption languages only,
written by vldistill before task samples) is refused: rebuild it with ``vldistill cache ... --rebuild``.

**Why safetensors shards rather than Arrow through** ``datasets``: every column is a fixed-shape tensor, which
safetensors stores raw in float32, float16 or bfloat16 (Arrow has no bfloat16). A random training batch is then a
few ``os.pread`` calls per shard at offsets computed from the header, with no conversion from Arrow list arrays and
nothing read or mapped that the batch does not need, so the resident memory does not grow with the cache
(:mod:`vldistill.cache.read` says why not a memory map). A
shard is one file written once (temporary name, then ``os.replace``): a killed build leaves whole shards and a
manifest listing them, so resuming is "start after the last listed shard". And it adds no dependency: the project
already stores weights in safetensors.

**Checksums; damaged shards recomputed.** The manifest lists each shard's size, SHA-256 (computed from the bytes as
they are written) and modification time. :class:`CachedTeachers` checks every shard when the cache is opened, before
a step trains, and refuses a damaged one by name: a shard whose size and time are the recorded ones is trusted by
``stat`` (as ``make`` and ``rsync`` trust a file), any other is hashed (a copied cache, a rewritten shard), so
opening a large cache costs a ``stat`` per shard rather than a read of every byte (at CC12M scale, tens of GB per
process per run). Not caught at opening: bytes changed in place with the time set back by hand, or damage that keeps
size and time (bit rot). ``vldistill cache`` hashes every shard it would reuse, recomputes the damaged ones (running
every teacher the cache holds, on those rows only) and records the present times; ``--rebuild`` builds the cache
anew. Caches written before checksums are checked by size only, and before times were stored, by SHA-256 at every
opening. A teacher output that is not finite is never cached, and a non-finite value read in training stops the run
naming the shard and row.

**Several teachers, added later.** A cache holds one set of ``t{k}.*`` columns per teacher; a run reads the columns of
its own teachers, matched by identity (so a cache of teachers A and B serves a recipe of B alone, or of B and A). A
build for a teacher the cache lacks (same data and settings) adds its columns to every shard without running the
cached teachers again, on the stored views; until the last shard is rewritten the manifest says ``extending`` and the
cache is not used. The row digests never change, so a new teacher may read only the text fields they cover.

**Identity checks.** The manifest records, per teacher: its id (hub id or resolved directory) and revision, a
SHA-256 of its weights (state dict) and, when it was loaded from a directory or the local hub cache, of its weight
files and ``config.json``; a hash of its processor (the tokenizer's full ``tokenizer.json`` and padding side, the
image processor's ``to_dict()``); its dtype and text fields. Also the dataset fingerprint, the augmentation
settings, the storage dtype and the vldistill version. Opening a cache for a run compares each of them (the weights
by whichever hash both sides have; the id and revision only when neither hash can be computed) and raises
:class:`CacheError` naming the first field that differs.

**Dataset fingerprint.** Each sample's digest is a BLAKE2b-128 of its image *content* (the file's bytes, or the
in-memory bytes or pixels) and of its texts in the cached fields (captions, questions, answers, hypotheses, each
candidate and rationale); the fingerprint is a SHA-256 of the digests in order. Content, not paths and modification
times: a copied dataset still matches, a changed image or text does not. It costs one read of every image file (no
decoding). Cached rows are found by digest, so a cache also serves a subset or a reordering of the data it was built
on; a sample with no cached row is refused (with the count).

**Augmented views.** With ``cache.views: K > 1``, each image gets K random resized crops / horizontal flips whose
parameters are drawn from (seed, sample digest, view) and *stored*; training picks a view per sample and epoch
(every view once per K epochs, see ``StageSampler``) and the collator applies the stored parameters to the student's
image, so the teacher's target is always for the view the student sees.

This package sits beside the trainer (it reuses the trainer's preprocessing, ``teacher_texts`` and ``encode_batch``,
so a cached output is exactly what the live teacher would give); nothing else in the library imports it.
"""

from __future__ import annotations

from .build import build_cache
from .fingerprint import dataset_digests, dataset_fields, fingerprint, sample_digest
from .identity import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CacheError,
    files_digest,
    processor_digest,
    read_manifest,
    teacher_identity,
    weights_digest,
)
from .read import CachedTeachers
from .recipe import (
    build_recipe_cache,
    open_recipe_cache,
    recipe_cache_dir,
    recipe_fields,
    recipe_identities,
    recipe_needs_tokens,
)
from .views import ViewTable, apply_view, augmentation_settings, sample_view
from .writer import SHARD_BYTES

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SHARD_BYTES",
    "CacheError",
    "CachedTeachers",
    "ViewTable",
    "apply_view",
    "augmentation_settings",
    "build_cache",
    "build_recipe_cache",
    "dataset_digests",
    "dataset_fields",
    "files_digest",
    "fingerprint",
    "open_recipe_cache",
    "processor_digest",
    "read_manifest",
    "recipe_cache_dir",
    "recipe_fields",
    "recipe_identities",
    "recipe_needs_tokens",
    "sample_digest",
    "sample_view",
    "teacher_identity",
    "weights_digest",
]
