"""Break lmforge on purpose, one small break at a time, and check that the test named for it fails.

Each mutant is an exact text replacement in one file of a copy of src/lmforge (the working tree is never
touched); the named tests run against the copy (PYTHONPATH first, ahead of the editable install) and every one
of them must fail. A mutant whose target text is no longer in the file is an error: update the mutant with the
code. First the named tests run unmutated and must pass, so that a failure means the break was caught.
Mutants run --jobs at a time (default 2, one per core of the machine `make test` is sized for), each job in
its own copy of the package. Each pytest run is a process forked from a server that imported torch, pytest and the
other test dependencies once (multiprocessing's forkserver), so a mutant pays only for its tests and its copy of
lmforge, not for seconds of imports. `make test` runs this after pytest.

    .venv/bin/python scripts/mutation_check.py            # every mutant, a table, exit 1 if one survives
    .venv/bin/python scripts/mutation_check.py --list     # the mutants and their tests
    .venv/bin/python scripts/mutation_check.py rng-restore sha256-check   # only these
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import queue
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "lmforge"


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/lmforge
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids; each must fail


MUTANTS = [
    Mutant("rng-restore", "train/trainer.py",
           'restore_rng(mine["rng"])', 'pass  # mutant: RNG not restored',
           ("tests/test_checkpoint.py::test_resume_auto_gives_identical_losses",)),
    Mutant("guard-restore", "train/trainer.py",
           'self.guard.load_state_dict(state.get("guard") or {})', 'pass  # mutant: guard state not restored',
           ("tests/test_faults.py::test_nonfinite_skip_skips_the_step_counts_it_and_resumes_exactly",
            "tests/test_faults.py::test_a_loss_spike_is_skipped_and_the_guard_state_resumes_exactly")),
    Mutant("sha256-check", "checkpoint/manifest.py",
           'if sha256_file(f) != entry.get("sha256"):', 'if False:  # mutant: no sha256 check',
           ("tests/test_faults.py::test_corruption_is_named_and_resume_auto_falls_back_saying_so[flipped-weights]",)),
    Mutant("manifest-missing-file", "checkpoint/manifest.py",
           'if name not in manifest["files"]:\n            raise _unlisted(ckpt, name, why)',
           'if False:  # mutant: a file left out of the manifest is accepted\n            raise _unlisted(ckpt, name, why)',
           ("tests/test_checkpoint_files.py::test_a_manifest_missing_a_required_file_is_refused_by_every_reader"
            "[training-model.safetensors]",)),
    Mutant("muon-orientation", "train/muon.py",
           "tall = G.size(-2) > G.size(-1)", "tall = G.size(-2) < G.size(-1)  # mutant: the iteration on the long side",
           ("tests/test_muon.py::test_batched_bf16_step_equals_torch_muon[original-True]",
            "tests/test_muon.py::test_batched_bf16_step_equals_torch_muon[match_rms_adamw-False]")),
    Mutant("muon-gram", "train/muon.py",
           "            A = P @ (P @ A)", "            A = P @ A  # mutant: the Gram matrix updated by P once, not P^2",
           ("tests/test_muon.py::test_a_wide_matrix_goes_through_its_gram_matrix_and_gets_the_same_iteration",)),
    Mutant("muon-fsdp-local-rows", "train/muon.py",
           "            sharded = _is_sharded(params[0])",
           "            sharded = False  # mutant: each FSDP process orthogonalises only its own rows",
           ("tests/test_fsdp.py::test_muon_under_fsdp_matches_one_process",)),
    Mutant("muon-fsdp-unshared", "train/muon.py",
           "    mine = rows.redistribute(mesh, [Shard(0)]).to_local()  # (n here, rows, cols): whole matrices",
           "    from torch.distributed.tensor import Replicate  # mutant: every process orthogonalises every matrix\n"
           "    done = DTensor.from_local(orthogonalise(rows.full_tensor()), mesh, [Replicate()], run_check=False)\n"
           "    return done.redistribute(mesh, [Shard(1)]).to_local()",
           ("tests/test_fsdp.py::test_muon_under_fsdp_matches_one_process",)),
    Mutant("cli-allocator", "cli.py",
           "    keep_freed_memory()  # every command", "    pass  # mutant: no malloc settings; every command",
           ("tests/test_allocator.py::test_every_command_keeps_freed_memory_so_evaluation_does_not_page_fault",)),
    Mutant("attention-scale", "model.py",
           "y = self.attend(q, k, v,", "y = self.attend(q * 1.01, k, v,",
           ("tests/test_hf_parity.py::test_lmforge_to_hf_same_logits[gelu_new]",
            "tests/test_hf_parity.py::test_hf_to_lmforge_same_logits[lm-head-model]",
            "tests/test_hf_parity.py::test_llama_style_same_logits")),
    Mutant("norm-eps", "model.py",
           "nn.LayerNorm(config.n_embd, eps=config.norm_eps,", "nn.LayerNorm(config.n_embd, eps=config.norm_eps * 1.01,",
           ("tests/test_hf_parity.py::test_lmforge_to_hf_same_logits[n_inner]",)),
    Mutant("rope-base", "model.py",
           "rope_tables(c.block_size, c.head_dim, c.rope_theta,", "rope_tables(c.block_size, c.head_dim, c.rope_theta * 1.01,",
           ("tests/test_hf_parity.py::test_llama_style_same_logits",)),
    Mutant("mlp-activation", "model.py",
           'self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"',
           'self.approximate = "tanh"  # mutant: exact gelu computed as its tanh approximation',
           ("tests/test_hf_parity.py::test_lmforge_to_hf_same_logits[gelu]",)),
    Mutant("swiglu-gate", "model.py",
           "h = F.silu(gate) * up", "h = F.silu(gate * 1.01) * up",
           ("tests/test_hf_parity.py::test_llama_style_same_logits",)),
    Mutant("beam-second-best", "generate/beam.py",
           "for _, hyp in finished[p][:config.num_return_sequences]]",
           "for _, hyp in (finished[p][1:2] + finished[p][:1] + finished[p][2:])[:config.num_return_sequences]]",
           ("tests/test_generate_hf.py::test_beam_search_best_sequence_equals_hf_over_settings",)),
    Mutant("fsync-file", "files.py",
           "        fsync_path(tmp)\n        os.replace(tmp, path)", "        os.replace(tmp, path)",
           ("tests/test_fsync.py::test_an_atomic_write_fsyncs_the_file_then_its_parent_after_the_rename[text]",)),
    Mutant("fsync-parent", "files.py",
           "    fsync_path(path.parent)\n\n\n@contextlib.contextmanager", "\n\n@contextlib.contextmanager",
           ("tests/test_fsync.py::test_an_atomic_write_fsyncs_the_file_then_its_parent_after_the_rename[bytes]",)),
    Mutant("fsync-tree", "files.py",
           "    fsync_tree(new)\n", "",
           ("tests/test_fsync.py::test_a_checkpoint_save_fsyncs_every_file_the_directory_and_the_checkpoints_folder",
            "tests/test_fsync.py::test_an_atomic_directory_fsyncs_every_file_and_folder_then_its_parent")),
    Mutant("disk-full-temp-kept", "files.py",
           "    _remove(tmp)\n    if disk_full(error):", "    if disk_full(error):",
           ("tests/test_disk_full.py::test_a_full_disk_in_the_middle_of_a_shard_keeps_the_previous_dataset",)),
    Mutant("sft-prompt-unmasked", "data/batches.py",
           "    y[:max(int(examples.prompt_lengths[e]) - 1, 0)] = IGNORE_INDEX\n", "",
           ("tests/test_tasks.py::test_labels_are_ignored_exactly_on_prompt_targets_and_padding",)),
    Mutant("lora-b-nonzero", "lora.py",
           "self.B = nn.Parameter(torch.zeros(size, r, device=device, dtype=dtype))",
           "self.B = nn.Parameter(torch.full((size, r), 1e-3, device=device, dtype=dtype))",
           ("tests/test_lora.py::test_with_B_zero_the_adapted_model_equals_its_base_exactly",)),
    Mutant("packed-rows-see-each-other", "model.py",
           "keys_seen = ((ids[:, None, :] == query) & (query > 0)) | (query == 0)",
           "keys_seen = (ids[:, None, :] > 0) | (query == 0)",
           ("tests/test_tasks.py::test_a_packed_row_gives_the_loss_of_its_examples_run_one_by_one[learned]",)),
    Mutant("best-tracker-not-restored", "train/trainer.py",
           'self.selection.load_state_dict(state.get("selection") or {})', 'pass  # mutant: best/patience not restored',
           ("tests/test_tasks.py::test_patience_stops_when_the_metric_stops_improving_and_a_resumed_ru"
            "n_stops_at_the_same_step",)),
    Mutant("best-ignores-direction", "checkpoint/layout.py",
           'return -float(value) if score.get("higher_is_better") else float(value)', 'return float(value)',
           ("tests/test_tasks.py::test_pruning_keeps_the_best_checkpoint_by_its_recorded_score",)),
    Mutant("encoder-is-causal", "model.py",
           "self.causal = config.causal", "self.causal = True",
           ("tests/test_encoder.py::test_every_position_of_an_encoder_sees_the_whole_text_and_a_decode"
            "r_only_the_past",)),
    Mutant("mlm-labels-everywhere", "data/batches.py",
           "labels = np.where(chosen, ids, IGNORE_INDEX)", "labels = ids",
           ("tests/test_encoder.py::test_bert_masking_chooses_15_percent_and_replaces_80_10_10",)),
    Mutant("speculative-residual", "generate/speculative.py",
           "left = (p[j] - q[j]).clamp_(min=0)", "left = p[j].clone()  # mutant: a refusal draws from p, not p - q",
           ("tests/test_speculative.py::test_speculative_sampling_keeps_the_models_distribution[options0]",)),
    Mutant("speculative-no-rollback", "generate/speculative.py",
           "self.cache.pos -= checked - (len(kept) - 1)", "pass  # mutant: refused guesses stay in the cache",
           ("tests/test_speculative.py::test_greedy_speculation_gives_plain_greedy_tokens_past_the_window"
            "[plain-learned]",)),
    Mutant("serve-speculation-ignored", "serve/engine.py",
           "        if batch.speculative:  # one job (_admit): its rows speculate in turn",
           "        if False:  # mutant: the server decodes plainly whatever its speculation settings",
           ("tests/test_serve_speculative.py::test_past_speculative_max_running_jobs_join_plain_batches",)),
    Mutant("bias-after-penalty", "generate/processors.py",
           "        scores = bias_logits(scores, config.logit_bias)\n    if config.sequence_bias:\n"
           "        scores = sequence_bias(scores, tokens, real, config.sequence_bias)\n"
           "    if config.encoder_repetition_penalty != 1.0 and generated is not None:\n"
           "        scores = prompt_penalty(scores, seen_tokens(tokens, prompt_columns(tokens, real, generated), "
           "scores.size(-1)),\n                                config.encoder_repetition_penalty)\n"
           "    if config.repetition_penalty != 1.0:\n"
           "        scores = repetition_penalty(scores, seen_tokens(tokens, real, scores.size(-1)), "
           "config.repetition_penalty)\n",
           "        pass\n    if config.sequence_bias:\n"
           "        scores = sequence_bias(scores, tokens, real, config.sequence_bias)\n"
           "    if config.encoder_repetition_penalty != 1.0 and generated is not None:\n"
           "        scores = prompt_penalty(scores, seen_tokens(tokens, prompt_columns(tokens, real, generated), "
           "scores.size(-1)),\n                                config.encoder_repetition_penalty)\n"
           "    if config.repetition_penalty != 1.0:\n"
           "        scores = repetition_penalty(scores, seen_tokens(tokens, real, scores.size(-1)), "
           "config.repetition_penalty)\n    if config.logit_bias:  # mutant: the bias after the penalty\n"
           "        scores = bias_logits(scores, config.logit_bias)\n",
           ("tests/test_generate_hf.py::test_process_scores_equals_hfs_processors_in_their_order[2]",)),
    Mutant("min-new-tokens-ignores-stop-strings", "generate/rows.py",
           "look=len(self.tokens) >= self.config.min_new_tokens", "look=True",
           ("tests/test_generate.py::test_min_new_tokens_holds_back_end_ids_and_stop_strings_until_then",)),
    Mutant("guided-choice-never-ends", "generate/rows.py",
           "(self.config.guided_choice_ids is not None and self._chose())", "(False)",
           ("tests/test_generate.py::test_guided_choice_answers_with_one_choice_picking_the_best_allowed_token_"
            "each_step[choices0]",)),
    Mutant("guided-regex-never-ends", "generate/rows.py",
           "            (self.guide is not None and self.guide.complete(self.tokens))", "            False",
           ("tests/test_generate.py::test_guided_regex_keeps_the_text_on_the_pattern_and_picks_the_best_allowed_"
            "token[[0-9]{3}-[0-9]{4}]",)),
    Mutant("typical-by-probability", "generate/processors.py",
           "order = (-logp - entropy).abs().sort(dim=-1).indices", "order = (-logp).sort(dim=-1).indices",
           ("tests/test_generate_hf.py::test_sampling_filters_equal_hf_warpers_alone_and_in_hfs_order",)),
    Mutant("guidance-on-raw-logits", "generate/processors.py",
           "c, u = conditional.float().log_softmax(dim=-1), unconditional.float().log_softmax(dim=-1)",
           "c, u = conditional.float(), unconditional.float()  # mutant: guidance mixes raw logits",
           ("tests/test_generate_hf.py::test_classifier_free_guidance_equals_hf",)),
    Mutant("json-optional-always-written", "generate/json_schema.py",
           'after, first = f"(?:, {text})?{after}", f"(?:{text}{after}|{first})" if first else f"(?:{text})?"',
           'after, first = f", {text}{after}", f"{text}{after}"  # mutant: optional properties always written',
           ("tests/test_json_schema.py::test_optional_properties_may_each_be_left_out_and_commas_stay_right",)),
    Mutant("sequence-bias-ignores-prefix", "generate/processors.py",
           "added.index_add_(1, lasts, match.to(scores.dtype) * values)",
           "added.index_add_(1, lasts, values.expand(B, -1))  # mutant: a longer sequence's bias always applies",
           ("tests/test_generate_hf.py::test_sequence_bias_equals_hf_and_biases_only_where_a_sequence_completes",)),
    Mutant("watermark-before-temperature", "generate/processors.py",
           "    logits = filter_logits(scores.float() / config.temperature,",
           "    logits = filter_logits(marked(scores.float(), config, contexts) / config.temperature,  # mutant",
           ("tests/test_watermark.py::test_sampling_adds_the_mark_after_temperature_and_the_filters_as_hf",)),
    Mutant("healing-drops-its-text", "generate/rows.py",
           'piece, self.lead = self.lead + self.decoder.push(token_id), ""',
           'piece, self.lead = self.decoder.push(token_id), ""  # mutant: the healed token\'s text is lost',
           ("tests/test_token_healing.py::test_the_prompt_text_and_the_new_text_are_the_text_of_the_healed_prompt_and"
            "_the_new_tokens",)),
    Mutant("forced-end-past-the-budget", "generate/processors.py",
           "last = [j for j, (n, budget) in enumerate(zip(counts, budgets)) if n == budget - 1]",
           "last = [j for j, (n, budget) in enumerate(zip(counts, budgets)) if n == budget]  # mutant: one too late",
           ("tests/test_generate_hf.py::test_forced_tokens_equal_hf",)),
    Mutant("tokenizer-sees-val-and-test", "data/prepare.py",
           'tok = self._tokenizer(spool, splits["train"], tokenizer',
           'tok = self._tokenizer(spool, np.concatenate(list(splits.values())), tokenizer',  # mutant: val and test leak
           ("tests/test_prepare.py::test_tokenizer_and_token_statistics_come_from_the_train_split_and_counts_are_per"
            "_split",)),
    Mutant("int8-one-scale-per-tensor", "generate/quantize.py",
           "scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)",
           "scale = w.abs().amax().clamp(min=1e-12).expand(w.shape[0]) / 127  # (out,)  mutant: one scale",
           ("tests/test_generate.py::test_int8_linear_has_one_scale_per_output_channel",)),
    Mutant("completion-loss-counts-the-prompt", "eval/tasks.py",
           "counted += int((y != IGNORE_INDEX).sum())",
           "counted += int(y.numel())  # mutant: prompt and pads counted",
           ("tests/test_eval_tasks.py::test_completion_loss_counts_only_completion_tokens_and_is_batch_independent",)),
    Mutant("choices-see-context-pads", "eval/choices.py",
           "seen = torch.cat([mask[parent], more], dim=1)",
           "seen = torch.cat([torch.ones_like(mask[parent]), more], dim=1)  # mutant: choices attend to the pads",
           ("tests/test_choices.py::test_loglikelihoods_acc_and_acc_norm_equal_lm_evaluation_harness_on_the_exported"
            "_model",)),
    Mutant("fused-loss-trains-ignored-targets", "head_loss.py",
           "            dz *= counted[:, None]\n",
           "            pass  # mutant: positions with target -100 still send gradients\n",
           ("tests/test_chunked_loss.py::test_loss_and_gradients_equal_the_unfused_ones[4-0.0]",)),
    Mutant("trainer-makes-the-whole-logits", "train/trainer.py",
           'if self.config.train.loss_chunk > 0 and self.config.model.head != "classify" and not need_logits:',
           "if False:  # mutant: the head is never fused with its loss",
           ("tests/test_chunked_loss.py::test_a_training_step_never_holds_the_whole_logits[16]",)),
    Mutant("peft-alpha-per-rank", "interop/peft_export.py",
           '"lora_alpha": _number(lora_config.plain_alpha * default_r / lora_config.r),',
           '"lora_alpha": _number(lora_config.plain_alpha),  # mutant: alpha not scaled with the stacked rank',
           ("tests/test_peft_export_guards.py::test_a_gpt2_adapter_on_q_and_v_only_has_rank_2r_and_alpha_2alpha_and"
            "_peft_gives_its_logits",)),
    Mutant("serve-seeded-batched-past-block", "serve/engine.py",
           "return self.config.is_greedy or self.config.seed is not None",
           "return self.config.is_greedy  # mutant: a seeded job may join a batch that slides its window",
           ("tests/test_serve_guards.py::test_a_seeded_job_is_not_batched_where_a_longer_prompt_would_push_it_past_the"
            "_block",)),
    Mutant("serve-end-token-counted", "serve/engine.py",
           "choice.tokens += event.token is not None",
           "choice.tokens += 1  # mutant: the end token counts as a completion token",
           ("tests/test_serve_guards.py::test_an_end_token_is_not_counted_as_a_completion_token",)),
    Mutant("prepare-dedupe-joined-texts", "data/tasks.py",
           'f"{len(prompt)}:{prompt}{completion}"',
           'f"{prompt}{completion}"',  # mutant: pairs that join to the same text count as duplicates
           ("tests/test_tasks_guards2.py::test_pairs_whose_texts_join_the_same_are_not_duplicates",)),
    Mutant("repetition-penalty-sees-pads", "generate/processors.py",
           "ids = tokens if real is None else tokens.masked_fill(~real, vocab_size)",
           "ids = tokens  # mutant: a padded row's pads count as seen tokens",
           ("tests/test_processors_guards2.py::test_each_row_of_a_padded_batch_scores_as_it_would_alone[options0]",)),
    Mutant("dpo-chosen-rejected-swapped", "train/preference.py",
           "chosen, rejected = slice(0, None, 2), slice(1, None, 2)",
           "chosen, rejected = slice(1, None, 2), slice(0, None, 2)",  # mutant: rows 2k+1 as chosen
           ("tests/test_preference.py::test_the_trainers_val_loss_and_lmforge_eval_are_dpo_by_hand",)),
    Mutant("dpo-lora-reference-keeps-adapters", "train/preference.py",
           "    with adapters_off(policy):\n        yield policy",
           "    yield policy  # mutant: the LoRA policy is its own reference, adapters on",
           ("tests/test_preference.py::test_the_first_step_loss_is_log_2_and_training_leaves_the_reference_alone",)),
    Mutant("reference-free-loss-keeps-a-reference", "train/trainer.py",
           "if self.preference and self.preference_loss.needs_reference",
           "if self.preference  # mutant: simpo / orpo still copy the model as a reference\n",
           ("tests/test_preference_losses.py::test_a_reference_free_loss_keeps_and_runs_no_reference",)),
    Mutant("ipo-counts-one-token-less", "preference_loss.py",
           "nc, nr = chosen_tokens.float().clamp(min=1)",
           "nc, nr = (chosen_tokens - 1).float().clamp(min=1)",  # mutant: the end token left out of the average
           ("tests/test_preference_losses.py::test_the_reference_losses_equal_trls_dpo_trainer[ipo]",)),
    Mutant("precomputed-reference-values-on-other-rows", "data/batches.py",
           "torch.from_numpy(examples.reference_logps[rows])",
           "torch.from_numpy(examples.reference_logps[rows[::-1].copy()])",  # mutant: the batch's rows reversed
           ("tests/test_preference_precompute.py::test_precomputed_reference_trains_and_evaluates_as_the_live_one",)),
    Mutant("precompute-every-process-scores-the-first-share", "train/preference.py",
           "starts = range(dist.rank * batch_size, units, batch_size * dist.world_size)",
           "starts = range(0, units, batch_size * dist.world_size)",  # mutant: rank 1 scores rank 0's batches again
           ("tests/test_preference_precompute.py::test_two_processes_score_their_shares_and_train_like_one",)),
    Mutant("nca-weighs-the-chosen-push-down-fully", "preference_loss.py",
           "loss = -F.logsigmoid(reward_c) - 0.5 * F.logsigmoid(-reward_c)",
           "loss = -F.logsigmoid(reward_c) - F.logsigmoid(-reward_c)",
           ("tests/test_preference_losses.py::test_each_loss_is_its_papers_formula_by_hand[nca]",)),
    Mutant("nll-term-averages-over-the-rejected-tokens", "preference_loss.py",
           "loss = loss - self.nll_weight * policy_chosen.float() / chosen_tokens.float().clamp(min=1)",
           "loss = loss - self.nll_weight * policy_chosen.float() / rejected_tokens.float().clamp(min=1)",
           ("tests/test_preference_nll.py::test_the_nll_term_is_alpha_times_the_chosen_mean_negative_logprob[dpo]",)),
    Mutant("kto-reference-point-of-one-process", "train/preference.py",
           "    totals = all_reduce_sum(totals, dist)\n    return reference_point(totals[0], totals[1])",
           "    return reference_point(totals[0], totals[1])  # mutant: each process its own reference point",
           ("tests/test_unpaired.py::test_two_processes_train_kto_like_one",)),
    Mutant("kto-mismatched-row-is-the-examples-own", "data/batches.py",
           "partners = np.roll(drawn, 1) if", "partners = drawn if",
           ("tests/test_unpaired.py::test_a_mismatched_row_is_a_prompt_with_the_previous_draws_completion",)),
    Mutant("kto-weights-swapped", "preference_loss.py",
           "torch.where(desirable, self.desirable_weight * good, self.undesirable_weight * bad)",
           "torch.where(desirable, self.undesirable_weight * good, self.desirable_weight * bad)",
           ("tests/test_unpaired.py::test_kto_equals_trls_kto_trainer[kto]",)),
    Mutant("kto-reference-point-not-clamped", "preference_loss.py",
           "rows.double().clamp(min=1)).clamp(min=0).float()", "rows.double().clamp(min=1)).float()",
           ("tests/test_unpaired.py::test_the_reference_point_is_the_mean_log_ratio_clamped_at_zero",)),
    Mutant("reward-model-chosen-and-rejected-swapped", "train/trainer.py",
           "chosen, rejected = rewards[0::2, 0].float(), rewards[1::2, 0].float()",
           "rejected, chosen = rewards[0::2, 0].float(), rewards[1::2, 0].float()",
           ("tests/test_reward_model.py::test_the_first_step_and_the_val_loss_are_the_loss_by_hand_with_the_centring_"
            "term[0.0]",)),
    Mutant("reward-model-centring-term-dropped", "train/trainer.py",
           "loss = reward_model_loss(chosen, rejected, self.config.train.reward_center_coefficient, *margin)",
           "loss = reward_model_loss(chosen, rejected, 0.0, *margin)",
           ("tests/test_reward_model.py::test_the_first_step_and_the_val_loss_are_the_loss_by_hand_with_the_centring_"
            "term[0.0]",)),
    Mutant("reward-model-reads-past-the-padding", "generate/reward.py",
           "out += self.model(x.to(device), attention_mask=mask.to(device))[:, 0].float().tolist()",
           "out += self.model(x.to(device))[:, 0].float().tolist()",
           ("tests/test_reward_model.py::test_the_python_reward_model_scores_text_as_training_read_it",)),
    Mutant("online-pairs-ranked-upside-down", "train/online.py",
           "order += [2 * k, 2 * k + 1] if rewards[k, 0] >= rewards[k, 1] else [2 * k + 1, 2 * k]",
           "order += [2 * k + 1, 2 * k] if rewards[k, 0] >= rewards[k, 1] else [2 * k, 2 * k + 1]",
           ("tests/test_online_preference.py::test_the_pairs_are_the_policys_samples_ranked_by_the_reward_model",
            "tests/test_online_preference.py::test_online_dpo_makes_the_policy_write_what_the_reward_model_prefers")),
    Mutant("online-training-on-the-datas-pairs", "train/trainer.py",
           "return self.preference_terms(model, batch, online=True)[0].sum(), None, None",
           "return self.preference_terms(model, batch)[0].sum(), None, None",
           ("tests/test_online_preference.py::test_online_dpo_makes_the_policy_write_what_the_reward_model_prefers",)),
    Mutant("grpo-advantages-not-group-relative", "preference_loss.py",
           "advantages = r - r.mean(dim=1, keepdim=True)", "advantages = r",
           ("tests/test_grpo.py::test_advantages_are_trls[True]",
            "tests/test_grpo.py::test_advantages_are_trls[False]")),
    Mutant("grpo-dapo-divides-by-completions", "train/trainer.py",
           'return count_labels(batch[1]) if self.config.train.grpo_loss_type == "dapo" else batch[0].size(0)',
           "return batch[0].size(0)",
           ("tests/test_grpo.py::test_the_first_step_trains_on_its_own_samples_with_the_formulas_loss[dapo]",)),
    Mutant("grpo-kl-term-dropped", "train/trainer.py",
           "losses = grpo_token_loss(logps, advantages, reference, tc.grpo_beta, old,",
           "losses = grpo_token_loss(logps, advantages, reference, 0.0, old,",
           ("tests/test_grpo.py::test_the_kl_term_holds_the_policy_from_step_2_on",)),
    Mutant("grpo-clip-never-bites", "preference_loss.py",
           "clipped = torch.clamp(ratio, 1.0 - epsilon[0], 1.0 + epsilon[1])", "clipped = ratio",
           ("tests/test_grpo_iterations.py::test_the_clipped_loss_and_its_gradient_are_trls[dapo-None-token]",
            "tests/test_grpo_iterations.py::"
            "test_a_generation_trains_grpo_iterations_steps_with_the_clipped_ratio[token]")),
    Mutant("grpo-generation-not-kept-in-a-checkpoint", "train/trainer.py",
           'mine["rollouts"] = self.rollouts.state_dict()', "pass",
           ("tests/test_grpo_iterations.py::test_a_checkpoint_inside_a_generation_resumes_bit_identically",)),
    Mutant("grpo-logps-untempered", "train/trainer.py",
           "temperature = self.config.train.online_temperature", "temperature = 1.0",
           ("tests/test_grpo_objectives.py::test_grpo_scores_the_samples_under_the_tempered_distribution[64]",)),
    Mutant("distill-gradient-ignores-temperature", "head_loss.py",
           "dz.mul_(teacher.alpha / t)", "dz.mul_(teacher.alpha)",
           ("tests/test_distill.py::test_the_divergence_and_its_gradient_are_trls[0.0-1.7-0.0]",)),
    Mutant("distill-teacher-reads-packed-rows-whole", "train/distill.py",
           "hidden = teacher.hidden_states(x, attention_mask=attention_mask)", "hidden = teacher.hidden_states(x)",
           ("tests/test_distill.py::test_sft_data_distills_the_completions_positions_only[True]",)),
    Mutant("gguf-rope-halves-not-interleaved", "interop/gguf_export.py",
           "q, k = interleave_halves(q, config.n_head), interleave_halves(k, config.n_kv_head)",
           "q, k = interleave_halves(q, config.n_head), k",
           ("tests/test_gguf_export.py::"
            "test_gguf_loads_in_transformers_with_the_same_logits_and_token_ids[llama-char]",)),
    Mutant("gguf-import-leaves-llama-cpp-row-order", "interop/gguf_import.py",
           "q, k = _halves_from_interleaved(q, config.n_head), _halves_from_interleaved(k, config.n_kv_head)",
           "q, k = q, _halves_from_interleaved(k, config.n_kv_head)",
           ("tests/test_gguf_import.py::test_rows_of_each_q_and_k_head_go_back_to_lmforges_order",)),
    Mutant("gguf-space-not-spelled-for-sentencepiece", "interop/gguf_export.py",
           'tokens += [SPACE if c == " " else c for c in chars]', "tokens += chars",
           ("tests/test_gguf_export.py::"
            "test_gguf_loads_in_transformers_with_the_same_logits_and_token_ids[llama-char]",)),
    Mutant("gguf-qwen2-rows-interleaved-like-llama", "interop/gguf_export.py",
           '                if arch == "llama":\n                    q, k = interleave_halves(',
           '                if arch != "gpt2":\n                    q, k = interleave_halves(',
           ("tests/test_qwen2.py::test_a_qwen2_model_goes_to_gguf_as_llama_cpps_qwen2_and_back",)),
    Mutant("gguf-llama3-digits-not-in-threes", "interop/gguf_pretokenizers.py",
           r"\p{L}+|\p{N}{1,3}| ?", r"\p{L}+|\p{N}+| ?",
           ("tests/test_gguf_pretokenizers.py::"
            "test_a_bpe_with_a_named_rule_goes_through_gguf_and_back_cutting_text_as_the_original[llama-bpe]",)),
    Mutant("kquant-candidates-from-the-first-minimum", "interop/gguf_kquants.py",
           "        span = high - low\n        span = np.where(span == 0, f32(1), span)\n", "",
           ("tests/test_gguf_kquants.py::"
            "test_the_vectorised_quantizer_writes_the_bytes_of_llama_cpps_reference_loops[q4_k]",)),
    Mutant("kquant-no-search-over-scales", "interop/gguf_kquants.py",
           "for step in range(nstep + 1):", "for step in range(0):",
           ("tests/test_gguf_kquants.py::"
            "test_k_quant_blocks_read_back_close_and_beat_the_older_types_of_as_many_bits",)),
    Mutant("kquant-q3-levels-not-refined", "interop/gguf_kquants.py",
           "    changed = _q3_pass(x, w, wx, q, sumlx, suml2, nmax)  # the first pass over every sub-block, in place",
           "    changed = np.zeros(x.shape[1], dtype=bool)",
           ("tests/test_gguf_kquants.py::"
            "test_the_vectorised_quantizer_writes_the_bytes_of_llama_cpps_reference_loops[q3_k]",)),
    Mutant("kquant-q2-squared-not-absolute-error", "interop/gguf_kquants.py",
           "_with_minimums(blocks, 16, 3, -0.5, 15, 15, np.abs, mad=True)",
           "_with_minimums(blocks, 16, 3, -0.5, 15, 15, np.abs, mad=False)",
           ("tests/test_gguf_kquants.py::"
            "test_the_vectorised_quantizer_writes_the_bytes_of_llama_cpps_reference_loops[q2_k]",)),
    Mutant("iq4-no-search-over-scales", "interop/gguf_kquants.py",
           "    for step in range(-ntry, ntry + 1):", "    for step in range(0):",
           ("tests/test_gguf_kquants.py::"
            "test_the_vectorised_quantizer_writes_the_bytes_of_llama_cpps_reference_loops[iq4_nl]",)),
    Mutant("iq4-xs-super-scale-sign-flipped", "interop/gguf_kquants.py",
           "    d = -_largest(scales, axis=1) / f32(32)", "    d = _largest(scales, axis=1) / f32(32)",
           ("tests/test_gguf_kquants.py::"
            "test_the_vectorised_quantizer_writes_the_bytes_of_llama_cpps_reference_loops[iq4_xs]",)),
    Mutant("kquant-fused-qkv-not-counted-as-values", "interop/gguf_kquants.py",
           '    if values or name.endswith("ffn_down.weight"):', '    if name.endswith("ffn_down.weight"):',
           ("tests/test_gguf_kquants.py::"
            "test_a_k_quant_export_has_llama_quantizes_types_loads_in_transformers_and_imports_back[gpt2-q4_k_m]",)),
    Mutant("gguf-lora-fused-rank-not-rescaled", "interop/gguf_lora.py",
           "b = tensor.float() * (rank / lora.r)", "b = tensor.float()",
           ("tests/test_gguf_lora.py::test_base_plus_the_adapter_as_llama_cpp_applies_it_is_the_merged_model"
            "[gpt2-qvo-mlp]",)),
    Mutant("gguf-lora-b-rows-not-reordered-like-the-base", "interop/gguf_lora.py",
           'if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):', "if False:",
           ("tests/test_gguf_lora.py::test_base_plus_the_adapter_as_llama_cpp_applies_it_is_the_merged_model"
            "[llama-qvo-mlp]",)),
    Mutant("empty-model-skips-more-than-the-init-fills", "model.py",
           'if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):',
           'if func.__name__.endswith("_"):',  # (the rope tables' in-place ops too: garbage tables)
           ("tests/test_interop.py::test_imported_model_gives_the_same_logits_and_greedy_text[llama]",)),
    Mutant("chat-template-bos-twice", "generate/rows.py",
           "if tokenizer.start_id is not None and ids[:1] != [tokenizer.start_id]:",
           "if tokenizer.start_id is not None:",
           ("tests/test_chat_template.py::"
            "test_an_imported_instruct_model_chats_in_its_own_template_as_transformers_renders_it[llama3]",)),
    Mutant("sentencepiece-first-word-space-kept", "tokenizer.py",
           "raw = raw[min(cut, self.strips_leading_space):]", "pass",
           ("tests/test_sentencepiece.py::test_ids_and_text_are_transformers[llama]",)),
    Mutant("sentencepiece-continuation-loses-its-space", "tokenizer.py",
           "return self._utf8.decode(self._tok.decode_bytes(ids, self._skip))",
           "return self._utf8.decode(self._tok.decode(ids, self._skip).encode())",
           ("tests/test_sentencepiece.py::test_a_continuation_keeps_the_space_a_whole_text_drops",)),
    Mutant("gguf-sentencepiece-scores-against-merge-order", "interop/gguf_export.py",
           "scores[token_id] = -float(rank)", "scores[token_id] = float(rank)",
           ("tests/test_gguf_sentencepiece.py::"
            "test_the_vocabulary_is_written_as_sentencepiece_with_scores_in_merge_order[llama]",)),
    Mutant("gguf-sentencepiece-merges-from-scores-worst-first", "interop/gguf_import.py",
           "merges.sort(key=lambda m: (m[0], m[1]))", "merges.sort(key=lambda m: (-m[0], m[1]))",
           ("tests/test_gguf_sentencepiece.py::"
            "test_a_file_with_scores_only_imports_the_merges_its_scores_imply[llama2-legacy]",)),
    Mutant("sentencepiece-completion-encoded-as-a-text-of-its-own", "data/tasks.py",
           "completions = tok.encode_continuations([c for _, c in pairs])",
           "completions = tok.encode_batch_arrays([c for _, c in pairs])",
           ("tests/test_sentencepiece_uses.py::"
            "test_an_sft_example_is_transformers_tokenization_of_the_prompt_followed_by_the_completion[llama]",)),
    Mutant("sentencepiece-guided-choice-after-a-space", "generate/rows.py",
           "guided_choice_ids=[tokenizer.encode_continuation(c) for c in config.guided_choice]",
           "guided_choice_ids=[tokenizer.encode(c) for c in config.guided_choice]",
           ("tests/test_sentencepiece_uses.py::test_guided_choice_answers_with_exactly_one_of_the_choices[llama]",)),
    Mutant("sentencepiece-bits-per-byte-count-the-first-space", "eval/perplexity.py",
           "total -= len(tokenizer.id_to_bytes(first)) - len(tokenizer.text_start_bytes(first))", "pass",
           ("tests/test_sentencepiece_uses.py::test_bits_per_byte_of_text_files_count_the_texts_utf8_bytes[llama]",)),
    Mutant("chat-template-jinjas-own-tojson", "data/chat_template.py", 'env.filters["tojson"] = _tojson', "pass",
           ("tests/test_chat_tools.py::"
            "test_the_models_template_lists_tools_and_writes_calls_and_results_as_transformers_does",)),
    Mutant("tool-call-completion-keeps-the-turns-end", "data/tasks.py",
           "return whole[len(prompt):len(whole) - len(end)]", "return whole[len(prompt):]",
           ("tests/test_chat_tools.py::"
            "test_fine_tuning_records_with_tools_learn_the_call_as_the_template_writes_it",)),
    Mutant("qwen3-gguf-rows-interleaved-as-llamas", "interop/gguf_export.py",
           'if arch == "llama":\n                    q, k = interleave_halves',
           'if arch in ("llama", "qwen3"):\n                    q, k = interleave_halves',
           ("tests/test_qwen3.py::test_qwen3_travels_through_gguf_and_back",)),
    Mutant("llama3-rope-without-the-ramp", "model.py", "return (1 - s) * inv_freq / factor + s * inv_freq",
           "return torch.where(s < 0.5, inv_freq / factor, inv_freq)",
           ("tests/test_llama3_rope.py::test_an_imported_llama3_scaled_model_computes_transformers_logits",)),
    Mutant("gguf-import-drops-a-tensor-it-has-no-place-for", "interop/gguf_import.py", "if unused:  # a tensor",
           "if False:  # a tensor",
           ("tests/test_gguf_import.py::"
            "test_a_tensor_the_model_has_no_place_for_is_refused_not_dropped[llama-blk.0.attn_extra.weight]",)),
    Mutant("gguf-llama3-rope-freqs-not-written", "interop/gguf_export.py",
           'yield "rope_freqs.weight", rope_factors(config)', "pass",
           ("tests/test_llama3_rope.py::"
            "test_gguf_export_writes_llama_cpps_rope_freqs_and_imports_back_to_the_same_scaling",)),
    Mutant("imatrix-scale-levels-not-refined", "interop/gguf_kquants.py",
           "    for _ in range(5):  # a set whose pass", "    for _ in range(0):  # a set whose pass",
           ("tests/test_gguf_imatrix.py::"
            "test_the_weighted_quantizers_write_the_bytes_of_llama_cpps_impl_loops[q4_k]",)),
    Mutant("imatrix-measured-but-not-used-by-export", "interop/gguf_export.py",
           "                            importance=importance.get(name))",
           "                            importance=None)",
           ("tests/test_gguf_imatrix.py::test_export_with_imatrix_text_weighs_the_block_matrices_not_the_head",)),
    Mutant("imatrix-iq4-scale-search-ignores-the-importance", "interop/gguf_kquants.py",
           "    w = x * x if w is None else w\n\n    def sums(iscale):", "    w = x * x\n\n    def sums(iscale):",
           ("tests/test_gguf_imatrix.py::"
            "test_the_weighted_quantizers_write_the_bytes_of_llama_cpps_impl_loops[iq4_xs]",)),
    Mutant("imatrix-fallback-rows-not-weighted", "interop/gguf_export.py",
           "    elif kind in gguf_kquants.LEGACY_WEIGHTED and importance is not None:", "    elif False:",
           ("tests/test_gguf_imatrix_file.py::test_rows_that_fall_back_and_the_legacy_types_are_weighed_too[q4_k_m]",)),
    Mutant("low-bit-head-q8_0-where-llama-quantize-writes-q6_k", "interop/gguf_export.py",
           'kind = "q6_k" if data.shape[-1] % gguf_kquants.QK_K == 0 else "q8_0"', 'kind = "q8_0"',
           ("tests/test_gguf_low_bit.py::test_a_head_of_whole_256_blocks_is_q6_k_as_llama_quantize_makes_it[q4_0]",)),
    Mutant("imatrix-in-file-replaced-not-added-to", "interop/gguf_export.py",
           "            measured[name] = measured[name].merged(a) if name in measured else a",
           "            measured[name] = a",
           ("tests/test_gguf_imatrix_file.py::test_in_files_add_their_sums_as_llama_imatrix_does",)),
    Mutant("imatrix-windows-not-begun-with-the-start-token", "interop/gguf_imatrix.py",
           "    ids[::context] = start_id", "    pass",
           ("tests/test_gguf_imatrix_file.py::test_start_each_window_reads_the_text_as_llama_imatrix_does",)),
    Mutant("imatrix-file-holds-means-not-sums", "interop/gguf_imatrix_file.py",
           "a.sum2.astype(np.float32)", "(a.sum2 / a.count).astype(np.float32)",
           ("tests/test_gguf_imatrix_file.py::"
            "test_lmforge_imatrix_writes_llama_cpps_gguf_layout_with_each_matrixs_sums",)),
    Mutant("imatrix-dat-values-not-divided-by-calls", "interop/gguf_imatrix_file.py",
           "(v / calls if calls > 0 else v)", "(v)",
           ("tests/test_gguf_imatrix_file.py::test_a_dat_imatrix_reads_as_llama_quantize_derives_it",)),
    Mutant("fused-loss-summed-in-place", "head_loss.py",
           "            loss = loss + ((lse - picked) * counted).sum()\n",
           "            loss += ((lse - picked) * counted).sum()\n",
           ("tests/test_chunked_loss.py::test_no_loss_is_a_tensor_added_to_in_place",)),
    Mutant("gguf-llama3-settings-not-scaled-to-an-integer-context", "interop/gguf_import.py",
           "    scale = rounded / context if rounded > 0 else 1.0", "    scale = 1.0",
           ("tests/test_llama3_rope.py::"
            "test_llama3_settings_scaled_alike_import_as_the_same_frequencies_and_bad_factors_are_refused",)),
    Mutant("tool-calls-read-without-the-templates-lead", "serve/app.py",
           "self.index, self.start, self.named, self.complete = 0, len(fmt.lead), False, False",
           "self.index, self.start, self.named, self.complete = 0, 0, False, False",
           ("tests/test_chat_tools.py::"
            "test_the_server_reads_calls_written_in_the_templates_form_whole_and_streamed",)),
    Mutant("gguf-header-skips-past-the-files-end", "interop/gguf_header.py",
           "    def skip(self, size: int) -> None:\n        if self.at + size > len(self.buffer):",
           "    def skip(self, size: int) -> None:\n        if False:",
           ("tests/test_gguf_header.py::test_a_damaged_header_is_refused_not_read_past",)),
    Mutant("gguf-import-reads-tensor-data-past-the-files-end", "interop/gguf_header.py",
           "    if start + size > Path(path).stat().st_size:", "    if False:",
           ("tests/test_gguf_import.py::test_a_file_that_is_not_gguf_and_a_run_with_checkpoints_are_refused",)),
    Mutant("gguf-rule-deepseek-coder-keeps-digit-runs", "interop/gguf_pretokenizers.py",
           'r"\\s?\\p{P}+", CJK, digits=True)', 'r"\\s?\\p{P}+", CJK, digits=False)',
           ("tests/test_gguf_pretokenizers.py::"
            "test_a_bpe_with_a_named_rule_goes_through_gguf_and_back_cutting_text_as_the_original[deepseek-coder]",)),
    Mutant("kquant-scale-search-keeps-the-first-candidates-levels", "interop/gguf_kquants.py",
           "        chosen = np.where(better, iscale, chosen)\n", "",  # (q4_0 keeps the levels found; Q6_K rounds again)
           ("tests/test_gguf_imatrix.py::"
            "test_the_legacy_types_under_an_importance_write_the_bytes_of_llama_cpps_impl_loops[q4_0]",)),
    Mutant("peft-import-ignores-alpha-pattern", "interop/peft_import.py",
           "            alpha = value\n            break", "            break",
           ("tests/test_peft_import.py::"
            "test_an_adapter_peft_made_computes_peft_s_logits_adapted_and_merged[llama-patterns-rslora]",)),
    Mutant("peft-import-gpt2-c-attn-rows-misplaced", "interop/peft_import.py",
           '(("q", 0, q), ("k", q, kv), ("v", q + kv, kv))', '(("q", 0, q), ("k", 0, kv), ("v", q + kv, kv))',
           ("tests/test_peft_import.py::"
            "test_an_adapter_peft_made_computes_peft_s_logits_adapted_and_merged[gpt2-attention-and-mlp]",)),
    Mutant("peft-import-head-weights-not-compared-with-the-base", "interop/peft_import.py",
           "if own.shape != tensors[key].shape or not torch.equal(own.detach().float(), tensors[key]):",
           "if False:",
           ("tests/test_peft_import.py::test_an_adapter_that_saved_its_heads_weights_is_refused_on_another_base",)),
    Mutant("gguf-adapter-import-keeps-llama-cpp-row-order", "interop/gguf_lora.py",
           "            tensor = _halves_from_interleaved(tensor, heads)", "            pass",
           ("tests/test_gguf_lora.py::"
            "test_an_adapter_file_read_back_onto_its_base_is_the_adapted_model[llama-qvo-mlp]",)),
    Mutant("gguf-adapter-import-alpha-0-scales-by-the-largest-rank", "interop/gguf_lora.py",
           '"alpha_pattern": {} if alpha else', '"alpha_pattern": {} if True else',
           ("tests/test_gguf_lora.py::"
            "test_an_adapter_file_read_back_onto_its_base_is_the_adapted_model[gpt2-qvo-mlp]",)),
    Mutant("lora-continued-run-drops-the-adapters-it-starts-from", "train/trainer.py",
           "        load_training_state(ckpt, model, None, device)  # verified; the adapters and heads", "        pass",
           ("tests/test_lora_continue.py::"
            "test_a_run_from_a_lora_run_starts_at_its_model_and_trains_its_adapters_on",)),
    Mutant("lora-continued-preference-reference-is-the-bare-base", "train/trainer.py",
           "own_copy = config.lora is None or self.adapters_loaded or", "own_copy = config.lora is None or",
           ("tests/test_lora_continue.py::"
            "test_preference_from_a_lora_run_takes_its_model_as_the_reference[False]",)),
    Mutant("lora-continued-reference-scores-keyed-without-the-adapters", "train/trainer.py",
           "base_fingerprint(model, adapters=self.adapters_loaded)", "base_fingerprint(model)",
           ("tests/test_lora_continue.py::test_precomputed_scores_of_other_adapters_are_not_reused",)),
    Mutant("dora-norm-takes-gradient", "lora.py",
           "        with torch.no_grad():\n"
           "            rows = self.frozen_weight()[adapter.start:adapter.start + adapter.size]\n"
           "            return torch.linalg.vector_norm(rows + self.scale * adapter.delta().to(rows.dtype), dim=1)",
           "        rows = self.frozen_weight()[adapter.start:adapter.start + adapter.size]\n"
           "        return torch.linalg.vector_norm(rows + self.scale * adapter.delta().to(rows.dtype), dim=1)",
           ("tests/test_dora.py::test_a_dora_linear_is_the_papers_formula_with_the_norm_taken_without_gradient[0.0]",)),
    Mutant("dora-export-scales-rows-no-adapter-covers", "interop/peft_export.py",
           "magnitude = torch.linalg.vector_norm(module.frozen_weight()[lo:lo + n].float(), dim=1).cpu()",
           "magnitude = torch.ones(n)",
           ("tests/test_dora.py::test_peft_computes_the_exported_dora_adapter_as_lmforge_does[gpt2-k]",)),
    Mutant("dora-import-mlp-magnitudes-misplaced", "interop/peft_import.py",
           "                magnitudes.setdefault((linear, target), []).append((offset, M))",
           "                magnitudes.setdefault((linear, target), []).append((0, M))",
           ("tests/test_peft_import.py::"
            "test_a_dora_adapter_peft_made_computes_peft_s_logits_adapted_and_merged[llama-every-module]",)),
    Mutant("lora-plus-b-at-the-plain-learning-rate", "train/optim.py",
           '            kind = "adapters_b"\n', "            pass\n",
           ("tests/test_lora_train.py::test_lora_plus_moves_B_at_lr_ratio_times_the_learning_rate_and_A_at_it",)),
    Mutant("rslora-gguf-adapter-keeps-plain-alpha", "interop/gguf_lora.py",
           "run_config.lora.plain_alpha,", "run_config.lora.alpha,",
           ("tests/test_gguf_lora.py::"
            "test_a_lora_run_exports_its_adapter_and_the_cli_refuses_misuse_in_one_line[True]",)),
    Mutant("kto-precomputed-partners-not-the-streams", "data/batches.py",
           "    partners = np.where(e == first, last, e - 1)", "    partners = np.where(e == first, e + 1, e - 1)",
           ("tests/test_unpaired_precompute.py::"
            "test_a_precomputed_kto_run_trains_and_evaluates_as_the_live_one[kto]",)),
    Mutant("kto-precomputed-kl-uses-the-completions-reference", "train/trainer.py",
           "(mismatched - ref_kl if mismatched is not None else None)",
           "(mismatched - ref if mismatched is not None else None)",
           ("tests/test_unpaired_precompute.py::"
            "test_a_precomputed_kto_run_trains_and_evaluates_as_the_live_one[kto]",)),
    Mutant("fsdp-teacher-stays-gathered-after-reading", "train/distill.py",
           '    if hasattr(teacher, "reshard"):  # an FSDPModule: the root keeps its gathered weights after a forward\n'
           "        teacher.reshard()\n", "    pass\n",
           ("tests/test_distill.py::test_two_processes_distill_like_one[False-fsdp]",)),
    Mutant("q8-0-rounds-halves-to-even", "interop/gguf_kquants.py",
           "    q = np.copysign(np.floor(np.abs(v) + f32(0.5)), v)", "    q = np.rint(v)",
           ("tests/test_gguf_kquants.py::test_q8_0_writes_the_bytes_ggufs_own_quantizer_writes",)),
    Mutant("served-lora-rows-decode-with-the-base", "generate/decode.py",
           "    chosen = row_sets(names) if any(names) else None", "    chosen = None",
           ("tests/test_serve_lora.py::test_jobs_of_several_adapters_share_a_decode_each_row_with_its_own[mixed]",)),
    Mutant("served-lora-batches-mix-more-sets-than-max-loras", "serve/engine.py",
           "        if len({j.adapter for j in group + [job]} - {None}) > self.max_loras:", "        if False:",
           ("tests/test_serve_lora.py::test_jobs_of_several_adapters_share_a_decode_each_row_with_its_own"
            "[one-set-per-decode]",)),
    Mutant("served-lora-rows-all-take-one-set", "lora.py", "    if len(distinct) == 1:", "    if True:",
           ("tests/test_serve_lora.py::test_jobs_of_several_adapters_share_a_decode_each_row_with_its_own[mixed]",)),
    Mutant("served-lora-guided-rows-negative-side-on-the-base", "generate/decode.py",
           "[rows[i].adapter for i in guided]", "[None for i in guided]",
           ("tests/test_serve_lora.py::test_jobs_of_several_adapters_share_a_decode_each_row_with_its_own[mixed]",)),
    Mutant("served-lora-row-update-of-the-first-rows", "lora.py",
           "        apply(sets[name], x.index_select(0, rows), part)",
           "        apply(sets[name], x[:len(rows)], part)",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[lora]",)),
    Mutant("served-lora-consecutive-rows-update-lost", "lora.py",
           "            apply(sets[name], x[rows], y[rows])",
           "            apply(sets[name], x[rows], y[rows].clone())",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[lora]",)),
    Mutant("served-dora-gains-scale-the-bias", "lora.py",
           "        if bias is not None:\n            y.sub_(bias)", "        if None:\n            y.sub_(bias)",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[dora]",)),
    Mutant("int8-served-lora-skips-a-quantized-base", "lora.py",
           "        return _switched(self.sets, x, self.base(x), lambda",
           "        return self.base(x) if not isinstance(self.base, nn.Linear) else _switched(self.sets, x, "
           "self.base(x), lambda",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[lora]",)),
    Mutant("int8-dequantized-weight-drops-the-scale", "generate/quantize.py",
           "        return self.qweight.float() * self.scale.float()[:, None]", "        return self.qweight.float()",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[dora]",)),
    Mutant("lora-table-adapter-not-added", "lora.py",
           "        return y + self.scale * F.linear(F.embedding(idx, adapter.A.t()), adapter.B)", "        return y",
           ("tests/test_lora.py::test_merge_gives_a_plain_gpt_with_the_adapted_logits",)),
    Mutant("lora-tied-head-reads-the-table-unadapted", "lora.py",
           "        y = F.linear(x, self.weight)\n        if not self.embedding.active:",
           "        y = F.linear(x, self.weight)\n        if True:",
           ("tests/test_lora.py::test_merge_gives_a_plain_gpt_with_the_adapted_logits",)),
    Mutant("lora-table-adapter-beside-added-rows-accepted", "lora.py",
           "    if weights and isinstance(getattr(model, \"tok_emb\", None), LoRAEmbedding):",
           "    if None and isinstance(getattr(model, \"tok_emb\", None), LoRAEmbedding):",
           ("tests/test_added_tokens.py::test_an_embedding_adapter_beside_added_rows_is_one_line",)),
    Mutant("peft-export-tied-head-without-the-tables-adapter", "interop/peft_export.py",
           "    if tied:\n        out.update(", "    if None:\n        out.update(",
           ("tests/test_peft.py::test_names_shapes_and_scales_are_those_peft_saves_itself[gpt2-emb-qv]",)),
    Mutant("peft-import-table-adapter-unscaled", "interop/peft_import.py",
           "        A[:k], B[:, :k] = A_m, sB_m / lora.scale", "        A[:k], B[:, :k] = A_m, sB_m",
           ("tests/test_peft_import.py::test_an_adapter_peft_made_computes_peft_s_logits_adapted_and_merged"
            "[llama-embedding-rank-2]",)),
    Mutant("peft-import-tied-table-without-the-heads-adapter", "interop/peft_import.py",
           "        if head[\"A\"] is None or head[\"B\"] is None or not torch.allclose(",
           "        if None and not torch.allclose(",
           ("tests/test_peft_import.py::test_an_embedding_adapter_of_a_tied_model_without_the_heads_is_one_line",)),
    Mutant("gguf-table-adapter-lora-a-not-transposed", "interop/gguf_lora.py",
           "(tensor.t() if part.endswith(\"A\") else tensor)", "(tensor)",
           ("tests/test_gguf_lora.py::test_base_plus_the_adapter_as_llama_cpp_applies_it_is_the_merged_model"
            "[llama-emb-o]",)),
    Mutant("served-lora-table-unadapted", "lora.py",
           "        y.add_(F.linear(F.embedding(idx, self.At), self.B))", "        pass",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[lora-untied]",)),
    Mutant("served-lora-tied-head-reads-the-table-unadapted", "lora.py",
           "        model.lm_head.sets[name] = StackedAdapters(B.t().contiguous(), scale * A.t().contiguous())",
           "        pass",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[lora]",)),
    Mutant("pissa-niter-ignored", "lora.py", "                           config.init, config.pissa_niter)",
           "                           config.init, None)",
           ("tests/test_lora_init.py::test_pissa_niter_approaches_the_best_rank_r_part_with_more_iterations_and_starts_"
            "at_the_base",)),
    Mutant("bco-running-mean-not-resumed", "train/trainer.py",
           '            if self.bco is not None and state.get("bco") is not None:', "            if None:",
           ("tests/test_unpaired.py::test_a_bco_run_learns_logs_delta_evaluates_as_lmforge_eval_and_resumes_exactly",)),
    Mutant("bco-trains-around-zero", "train/trainer.py",
           "delta = torch.tensor(self.bco.update(", "delta = torch.tensor(0.0 * self.bco.update(",
           ("tests/test_unpaired.py::test_a_bco_run_learns_logs_delta_evaluates_as_lmforge_eval_and_resumes_exactly",)),
    Mutant("bco-delta-is-the-last-batchs-mean", "preference_loss.py",
           "            self.mean += (total / n - self.mean) * n / self.count", "            self.mean = total / n",
           ("tests/test_unpaired.py::test_the_running_mean_is_the_mean_of_every_reward_seen_and_takes_the_first_batch_"
            "whole",)),
    Mutant("bco-loss-sign-of-the-undesirable-flipped", "preference_loss.py",
           "good, bad = -F.logsigmoid(margin), -F.logsigmoid(-margin)",
           "good, bad = -F.logsigmoid(margin), -F.logsigmoid(margin)",
           ("tests/test_unpaired.py::test_bco_is_a_logistic_classifier_of_the_reward_around_delta_by_hand",)),
    Mutant("tool-call-arguments-run-into-mistrals-id", "serve/app.py",
           "            upto = len(self.text) if upto is None else upto  # object",
           "            upto = len(self.text) if end is None else end - 1  # object",
           ("tests/test_chat_tools.py::test_the_server_reads_calls_written_in_the_templates_form_whole_and_streamed"
            "[ids]",)),
    Mutant("tool-call-ids-dropped-from-turns", "data/conversation.py",
           '    kept = {"id": call["id"]} if isinstance(call.get("id"), str) else {}', "    kept = {}",
           ("tests/test_chat_tools.py::test_the_form_of_a_templates_calls_is_found_from_the_template",)),
    Mutant("gguf-string-arrays-packed-with-short-lengths", "interop/gguf_writer.py",
           'struct.pack(order + "Q", len(e)) + e', 'struct.pack(order + "I", len(e)) + e',
           ("tests/test_gguf_writer.py::test_arrays_pack_to_the_bytes_ggufs_writer_packs[strings]",)),
    Mutant("served-lora-echo-scored-with-the-base", "serve/engine.py",
           "            with use_adapter(job.adapter):  # its LoRA", "            with use_adapter(None):  # its LoRA",
           ("tests/test_serve_lora.py::test_each_named_run_generates_what_it_generates_alone_also_when_requests_mix",)),
    Mutant("served-lora-of-another-base-accepted", "generate/api.py",
           '        if lora_base(ckpt)["fingerprint"] != fingerprint:', "        if False:",
           ("tests/test_serve_lora.py::test_what_cannot_be_served_beside_the_base_is_one_clear_line[another-base]",)),
    Mutant("served-lora-stacked-b-on-the-first-rows", "lora.py",
           "            B[rows, j * r:(j + 1) * r] = b.detach()",
           "            B[:adapter.size, j * r:(j + 1) * r] = b.detach()",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[lora]",)),
    Mutant("served-dora-row-gains-dropped", "lora.py",
           "        if self.gain is None:\n            y.add_(update)", "        if True:\n            y.add_(update)",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[dora]",)),
    Mutant("pissa-offset-not-taken-off", "lora.py",
           "        return y if self.A0 is None else y - F.linear(F.linear(x, self.A0), self.B0)", "        return y",
           ("tests/test_lora_init.py::test_adapters_start_as_peft_starts_them_and_the_model_as_its_base[pissa]",)),
    Mutant("pissa-singular-values-not-divided-by-the-scale", "lora.py",
           "        root = torch.sqrt(S[:r] / scale)", "        root = torch.sqrt(S[:r])",
           ("tests/test_lora_init.py::test_adapters_start_as_peft_starts_them_and_the_model_as_its_base[pissa]",)),
    Mutant("pissa-peft-export-drops-the-offset", "interop/peft_export.py",
           "terms = [(a, A_, B_) for a in overlapping for A_, B_ in a.terms()]",
           "terms = [(a, a.A, a.B) for a in overlapping]",
           ("tests/test_lora_init.py::"
            "test_trained_adapters_compute_what_peft_computes_and_export_to_the_unchanged_base[olora]",)),
    Mutant("pissa-merge-drops-the-offset", "lora.py",
           "        return sum(b.float() @ a.float() for a, b in self.terms())",
           "        return self.B.float() @ self.A.float()",
           ("tests/test_lora_init.py::"
            "test_trained_adapters_compute_what_peft_computes_and_export_to_the_unchanged_base[pissa]",)),
    Mutant("served-pissa-set-drops-the-offset", "lora.py",
           "terms = [(adapter, a, b) for adapter in adapters for a, b in adapter.terms()]",
           "terms = [(adapter, adapter.A, adapter.B) for adapter in adapters]",
           ("tests/test_serve_lora.py::test_an_adapter_set_computes_what_its_adapted_model_computes_and_no_set_the_base"
            "[pissa]",)),
    Mutant("lora-continued-with-another-init", "config.py",
           "    shape = [(x.r, x.scale, sorted(x.targets), x.dora, x.init) for x in (ours, theirs)]",
           "    shape = [(x.r, x.scale, sorted(x.targets), x.dora) for x in (ours, theirs)]",
           ("tests/test_lora_init.py::test_init_with_dora_and_a_changed_init_when_continuing_are_one_line",)),
    Mutant("unloaded-lora-decodes-with-the-base", "serve/engine.py",
           "                    or (j.adapter is not None and j.adapter not in self.adapters)]:", "]:",
           ("tests/test_serve_lora.py::test_an_adapter_is_unloaded_only_once_no_request_decodes_with_it",)),
    Mutant("lora-unloaded-while-in-use", "serve/app.py",
           "            if engine.in_use(name):\n                return False\n", "",
           ("tests/test_serve_lora.py::test_runs_load_and_unload_while_serving_when_allowed",)),
    Mutant("peft-import-takes-another-tokenizer-for-added-tokens", "interop/peft_import.py",
           "    if grown.vocab_size > weight.shape[0] or any(\n",
           "    if grown.vocab_size > weight.shape[0] or None and any(\n",
           ("tests/test_added_tokens.py::test_a_peft_adapter_with_new_rows_but_no_tokenizer_or_another_is_one_line",)),
    Mutant("added-tokens-match-the-shortest-name-first", "tokenizer.py",
           "sorted(added_tokens, key=len, reverse=True)", "sorted(added_tokens, key=len)",
           ("tests/test_added_tokens.py::test_added_tokens_encode_as_transformers_added_tokens_and_move_no_other_id"
            "[char]",)),
    Mutant("added-tokens-extend-any-tokenizer", "tokenizer.py",
           "return count if self.without_added(count) == base.to_dict() else 0", "return count",
           ("tests/test_added_tokens.py::test_extends_counts_the_tokens_added_to_exactly_that_tokenizer[bpe]",)),
    Mutant("added-token-rows-start-at-zero", "model.py",
           "mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)", "mean = torch.zeros_like(weight[:1])",
           ("tests/test_added_tokens.py::test_resizing_the_vocabulary_keeps_every_logit_and_starts_new_rows_at_the_mean"
            "[False]",)),
    Mutant("lora-added-rows-train-the-base-rows-too", "lora.py",
           "        p.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:first]), grad[first:]]))",
           "        pass",
           ("tests/test_added_tokens.py::test_a_lora_run_trains_only_the_added_rows_of_the_embedding_and_head"
            "[gpt2-tied]",)),
    Mutant("lora-added-rows-of-an-untied-head-decay", "train/optim.py",
           "        embedding_ids |= {id(p) for p in added_row_weights(model).values()}", "        pass",
           ("tests/test_added_tokens.py::test_a_lora_run_trains_only_the_added_rows_of_the_embedding_and_head"
            "[llama-untied]",)),
    Mutant("lora-added-rows-reference-is-the-trained-policy", "train/trainer.py",
           "self.adapters_loaded or bool(added_row_weights(self.raw_model))", "self.adapters_loaded",
           ("tests/test_added_tokens.py::"
            "test_dpo_with_lora_on_added_tokens_keeps_their_starting_rows_in_the_reference",)),
    Mutant("added-tokens-are-control-tokens-in-gguf", "interop/gguf_export.py",
           "    plain = plain | set(tokenizer.added_token_ids.values())", "",
           ("tests/test_added_tokens.py::"
            "test_the_grown_model_exports_to_transformers_and_gguf_with_its_added_tokens",)),
    Mutant("special-added-tokens-decode-as-text", "tokenizer.py",
           "self._special_ids = self._special_ids | {self._added_ids[n] for n in special}", "pass",
           ("tests/test_added_tokens.py::"
            "test_special_added_tokens_match_in_text_and_decode_drops_them_as_transformers_does[byte]",)),
    Mutant("special-added-tokens-of-bpe-exported-plain", "interop/hf_tokenizer.py",
           't["special"] or t["content"] in tokenizer.special_added', 't["special"]',
           ("tests/test_added_tokens.py::"
            "test_special_added_tokens_match_in_text_and_decode_drops_them_as_transformers_does[bpe]",)),
    Mutant("peft-import-special-added-tokens-made-plain", "interop/peft_import.py",
           "if i in flags and flags[i].special]", "if False]",
           ("tests/test_added_tokens.py::"
            "test_a_peft_adapter_whose_tokenizer_added_special_tokens_imports_them_special",)),
    Mutant("lora-plus-embedding-adapter-at-the-b-rate", "train/optim.py",
           'scales = {"adapters_b": adapter_lr_ratio, "adapters_emb": embedding_lr_scale}',
           'scales = {"adapters_b": adapter_lr_ratio, "adapters_emb": adapter_lr_ratio}',
           ("tests/test_lora_train.py::"
            "test_lora_plus_lr_embedding_moves_the_tables_adapter_at_its_own_rate_on_the_schedules_shape",)),
    Mutant("qlora-base-left-in-full", "lora.py",
           'if config.quantize == "nf4" and real:', "if False:",
           ("tests/test_qlora.py::test_a_qlora_run_holds_its_base_in_4_bits_and_trains_only_the_adapters",)),
    Mutant("qlora-merged-model-keeps-4-bit-layers", "lora.py",
           "    return dequantize_blocks(model)\n\n\ndef dequantize_lora", "    return model\n\n\ndef dequantize_lora",
           ("tests/test_qlora.py::test_every_reader_of_a_qlora_run_computes_with_its_4_bit_base",)),
    Mutant("nf4-ties-take-the-upper-level", "nf4.py",
           "index = torch.bucketize(scaled, MIDPOINTS.to(flat.device))",
           "index = torch.bucketize(scaled, MIDPOINTS.to(flat.device), right=True)",
           ("tests/test_qlora.py::test_nf4_bytes_maxima_and_values_are_bitsandbytes_own[shape0]",)),
    Mutant("nf4-nibbles-swapped", "nf4.py",
           'PAIRS = torch.stack(torch.meshgrid(LEVELS, LEVELS, indexing="ij"), dim=-1)',
           'PAIRS = torch.stack(torch.meshgrid(LEVELS, LEVELS, indexing="xy"), dim=-1)',
           ("tests/test_qlora.py::test_nf4_bytes_maxima_and_values_are_bitsandbytes_own[shape0]",)),
    Mutant("nf4-last-block-cut-short-misread", "nf4.py",
           "        values = F.pad(values, (0, absmax.numel() * BLOCK - values.numel()))",
           "        values = F.pad(values, (absmax.numel() * BLOCK - values.numel(), 0))",
           ("tests/test_qlora.py::test_nf4_bytes_maxima_and_values_are_bitsandbytes_own[shape4]",)),
    Mutant("nf4-backward-gives-no-input-gradient", "nf4.py",
           "return (grad @ ctx.layer.dense(grad.dtype)).to(ctx.dtype), None",
           "return torch.zeros_like(grad @ ctx.layer.dense(grad.dtype)).to(ctx.dtype), None",
           ("tests/test_qlora.py::test_an_nf4_linear_computes_with_its_dequantized_weight_forward_and_backward",)),
    Mutant("fingerprint-blind-to-4-bit-weights", "lora.py",
           "for key, t in m.named_buffers()]", "for key, t in m.named_buffers() if False]",
           ("tests/test_qlora.py::test_the_fingerprint_of_a_quantized_model_covers_its_4_bit_weights",)),
    Mutant("double-quantized-maxima-lose-their-mean", "nf4.py",
           "    return values.reshape(-1)[:m] + offset", "    return values.reshape(-1)[:m]",
           ("tests/test_qlora.py::test_double_quantized_maxima_are_bitsandbytes_codes_save_for_its_tables_near_ties"
            "[shape0]",)),
    Mutant("double-quant-ignored", "nf4.py",
           "setattr(model.blocks.get_submodule(parent_name), child, NF4Linear(module, double))",
           "setattr(model.blocks.get_submodule(parent_name), child, NF4Linear(module))",
           ("tests/test_qlora.py::test_a_double_quantized_qlora_run_stores_less_and_computes_with_what_it_stores",)),
    Mutant("peft-import-of-a-qlora-adapter-on-the-base-in-full", "interop/peft_import.py",
           "lora = dataclasses.replace(lora, quantize=quantize, double_quant=double_quant)",
           "lora = dataclasses.replace(lora)",
           ("tests/test_qlora.py::test_a_peft_adapter_trained_with_qlora_imports_onto_the_4_bit_base_with_peft_logits"
            "[False]",)),
    Mutant("lora-slice-update-unscaled", "lora.py",
           "                y[..., adapter.start:adapter.start + adapter.size] += adapter(h) * self.scale",
           "                y[..., adapter.start:adapter.start + adapter.size] += adapter(h)",
           ("tests/test_lora.py::test_q_k_v_adapt_only_their_slice_of_qkv[v]",)),
    Mutant("lora-whole-output-update-unscaled", "lora.py",
           "                return y + update * self.scale", "                return y + update",
           ("tests/test_lora.py::test_merge_gives_a_plain_gpt_with_the_adapted_logits[gpt2]",)),
    Mutant("freed-memory-never-released", "allocator.py",
           "    return malloc_trim(0) == 1", "    return True",
           ("tests/test_allocator.py::test_memory_freed_for_good_goes_back_to_the_os_on_release",)),
    Mutant("amx-weight-gradient-in-one-product", "train/amx_linear.py",
           "            grad_w = g[:SLICE_TOKENS].t() @ x2[:SLICE_TOKENS]  # (out, in)\n"
           "            for start in range(SLICE_TOKENS, g.size(0), SLICE_TOKENS):\n"
           "                grad_w.addmm_(g[start:start + SLICE_TOKENS].t(), x2[start:start + SLICE_TOKENS])",
           "            grad_w = g.t() @ x2",
           ("tests/test_amx_linear.py::test_no_product_of_the_backward_runs_over_more_than_slice_tokens",)),
    Mutant("amx-weight-gradient-drops-its-last-slice", "train/amx_linear.py",
           "range(SLICE_TOKENS, g.size(0), SLICE_TOKENS)",
           "range(SLICE_TOKENS, g.size(0) - SLICE_TOKENS, SLICE_TOKENS)",
           ("tests/test_amx_linear.py::test_the_forward_is_f_linear_bit_for_bit_and_the_gradients_are_its_products"
            "[True]",)),
    Mutant("amx-linear-forward-drops-the-bias", "train/amx_linear.py",
           "return _product(x, weight, None if bias is None else bias.to(bf16))", "return _product(x, weight, None)",
           ("tests/test_amx_linear.py::test_the_forward_is_f_linear_bit_for_bit_and_the_gradients_are_"
            "its_products[True]",)),
    Mutant("amx-linear-fuses-the-bias-on-strided-inputs", "train/amx_linear.py",
           "    if bias is not None and x.is_contiguous() and _has_onednn_linear():",
           "    if bias is not None and _has_onednn_linear():",
           ("tests/test_amx_linear.py::test_a_strided_input_is_f_linears_too",)),
    Mutant("amx-linear-slices-narrow-layers", "train/amx_linear.py",
           "weight.numel() >= MIN_WEIGHT and", "weight.numel() >= 0 and",
           ("tests/test_amx_linear.py::test_narrow_layers_keep_torchs_product",)),
    Mutant("amx-linear-mode-on-a-narrow-model", "train/trainer.py",
           "m.weight.numel() >= amx_linear.MIN_WEIGHT", "m.weight.numel() >= 0",
           ("tests/test_amx_linear.py::test_the_trainer_leaves_it_off_without_a_trained_layer_wide_enough",)),
    Mutant("amx-linear-bias-gradient-doubled", "train/amx_linear.py",
           "grad_b = g.sum(0) if", "grad_b = 2 * g.sum(0) if",
           ("tests/test_amx_linear.py::test_the_forward_is_f_linear_bit_for_bit_and_the_gradients_are_"
            "its_products[True]",)),
    Mutant("amx-linear-routes-frozen-weights", "train/amx_linear.py",
           "if (weight.requires_grad and weight.numel()", "if (weight.numel()",
           ("tests/test_amx_linear.py::test_only_trained_weights_on_more_than_slice_tokens_are_routed",)),
    Mutant("amx-linear-never-on-in-the-trainer", "train/precision.py",
           "with amx_linear(amx and precision", "with amx_linear(False and precision",
           ("tests/test_amx_linear.py::test_a_trainer_step_with_it_has_the_same_loss_and_gradients_wit"
            "hin_bf16[bf16-compute]",)),
    Mutant("amx-linear-with-two-threads", "train/amx_linear.py",
           " and torch.get_num_threads() == 1 else", " else",
           ("tests/test_amx_linear.py::test_only_trained_weights_on_more_than_slice_tokens_are_routed",)),
    Mutant("amx-linear-mode-on-small-steps", "train/precision.py",
           'device.type == "cpu" and tokens > SLICE_TOKENS)', 'device.type == "cpu")',
           ("tests/test_amx_linear.py::test_a_step_on_no_more_than_slice_tokens_runs_without_the_mode",)),
    Mutant("amx-linear-under-torch-compile", "train/trainer.py",
           "self.amx = not (tc.compile or ", "self.amx = not (",
           ("tests/test_amx_linear.py::test_the_trainer_leaves_it_off_where_torch_must_see_its_own_ops",)),
    Mutant("attention-backward-dq-unscaled", "model.py",
           "grad_q = torch.baddbmm(q, grad_s, k, beta=0.0, alpha=ctx.alpha)",
           "grad_q = torch.baddbmm(q, grad_s, k, beta=0.0, alpha=1.0)",
           ("tests/test_precision.py::test_matmul_attention_equals_the_formula_with_its_gradients[causal-4]",)),
    Mutant("attention-backward-dv-untransposed", "model.py",
           "grad_v = torch.bmm(weights.transpose(1, 2), grad_y)", "grad_v = torch.bmm(weights, grad_y)",
           ("tests/test_precision.py::test_matmul_attention_equals_the_formula_with_its_gradients[encoder-2]",)),
    Mutant("loftq-one-step-whatever-loftq-iter", "lora.py",
           "        if step + 1 < iterations:  # the next", "        if False:  # the next",
           ("tests/test_loftq.py::test_the_start_is_peft_loftq_on_bitsandbytes_quantizer[3]",)),
    Mutant("loftq-stores-w-not-its-target", "lora.py",
           "                linear.weight.copy_(stored)", "                pass",
           ("tests/test_loftq.py::test_a_loftq_run_starts_nearer_the_base_in_full_than_qlora_and_learns",)),
    Mutant("loftq-adapters-left-at-default", "lora.py",
           "                layer.lora[adapter_name].B.copy_(B)", "                pass",
           ("tests/test_loftq.py::test_a_loftq_run_starts_nearer_the_base_in_full_than_qlora_and_learns",)),
    Mutant("loftq-adapters-offset-like-pissa", "lora.py",
           '        offset = init in ("pissa", "olora")', '        offset = init != "default"',
           ("tests/test_loftq.py::test_a_loftq_run_starts_nearer_the_base_in_full_than_qlora_and_learns",)),
    Mutant("loftq-ignores-double-quant", "lora.py",
           "        lost = w - round_trip(stored, double)", "        lost = w - round_trip(stored)",
           ("tests/test_loftq.py::test_the_adapters_bring_the_4_bit_weight_nearer_the_full_one_and_lea"
            "ve_other_rows_alone",)),
    Mutant("loftq-export-writes-the-base-in-full", "interop/hf_export.py",
           "            base = dequantize_lora(load_adapted_lora(ckpt, config))  # 4 bits)",
           "            base = load_adapted_lora(ckpt, dataclasses.replace(config, lora=dataclasses.replace("
           "config.lora, init='default', loftq_iter=1, quantize=None)))  # 4 bits)",
           ("tests/test_loftq.py::test_peft_on_transformers_4_bit_load_of_the_export_computes_the_runs_logits",)),
    Mutant("qlora-run-served-over-the-base-in-full", "generate/api.py",
           "            if not in_nf4:", "            if False:",
           ("tests/test_serve_qlora.py::test_what_the_4_bit_base_cannot_serve_is_one_line[in-full]",)),
    Mutant("loftq-run-served-over-a-shared-base", "generate/api.py",
           '            if config.lora.init == "loftq" and config.lora.loftq_iter > 1:', "            if False:",
           ("tests/test_serve_qlora.py::test_what_the_4_bit_base_cannot_serve_is_one_line[loftq]",)),
    Mutant("quantize-nf4-leaves-the-base-in-full", "generate/quantize.py",
           "        quantize_blocks(model)", "        pass",
           ("tests/test_serve_qlora.py::test_the_4_bit_base_holds_qloras_bytes_and_computes_near_the_base_in_full",)),
    Mutant("plan-measures-with-torchs-threads", "plan.py",
           "        with torch_threads(t.num_threads):", "        with torch_threads(None):",
           ("tests/test_plan.py::test_a_cpu_plan_measures_with_the_runs_threads_and_puts_them_back",)),
    Mutant("plan-cpu-bf16-element-wise-at-bf16-bytes", "plan.py",
           '    per_element = 4.0 / 3.0 if device == "cpu" and bf16 else 1.0', "    per_element = 1.0",
           ("tests/test_plan.py::test_a_cpu_bf16_plan_times_element_wise_passes_at_fp32s_bytes",)),
]


def target(copy: Path, mutant: Mutant) -> str:
    """The text of the mutant's file in the package copy; a target text that is missing or not unique is an error."""
    text = (copy / mutant.file).read_text(encoding="utf-8")
    found = text.count(mutant.old)
    if found != 1:
        raise SystemExit(f"mutant {mutant.name}: its target text occurs {found} times in src/lmforge/{mutant.file} "
                         f"(needs exactly 1): update the mutant in {Path(__file__).name} to the current code")
    return text


# What every test run imports before it reaches lmforge: imported once, in the fork server (never lmforge itself,
# which each run imports from its own copy).
PRELOAD = ["torch", "numpy", "pytest", "hypothesis", "transformers", "safetensors", "tokenizers", "httpx"]
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(PRELOAD)


def _pytest_in_this_process(package_parent: str, tests: tuple[str, ...], log: str) -> None:
    """The body of a forked test run: lmforge from package_parent (this process and the processes its tests
    start), pytest's report into `log`."""
    os.environ["PYTHONPATH"] = os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True
    sys.path.insert(0, package_parent)
    os.chdir(ROOT)
    import pytest

    with open(log, "w", encoding="utf-8") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pytest.main(["-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-rA", "--no-header", *tests])
    sys.exit(int(code))


def run_tests(package_parent: Path, tests: tuple[str, ...]) -> dict[str, str]:
    """{node id: PASSED | FAILED | SKIPPED | NOT RUN} of `tests` run against the package under package_parent;
    a node id naming a parametrized test stands for all its cases: FAILED if one of them failed."""
    assert tests, "no tests named: pytest would run the whole suite"
    assert "lmforge" not in sys.modules, "the fork server must not hold lmforge: each run imports its own copy"
    log = package_parent / "pytest.log"
    run = FORKS.Process(target=_pytest_in_this_process, args=(str(package_parent), tests, str(log)))
    run.start()
    run.join()
    stdout = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    reported = [re.match(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line) for line in stdout.splitlines()]
    outcomes = {}
    for test in tests:  # a node id pytest did not report (a typo, a renamed test) must not count as caught
        seen = {m.group(1) for m in reported if m and (m.group(2) == test or m.group(2).startswith(test + "["))}
        outcomes[test] = ("FAILED" if seen & {"FAILED", "ERROR"} else "PASSED" if "PASSED" in seen
                          else "SKIPPED" if seen else "NOT RUN")
    return outcomes


def junit_outcomes(path: Path, tests: tuple[str, ...]) -> dict[str, str]:
    """The outcomes run_tests would report for `tests`, read from the JUnit XML of a pytest run of the same code
    (make test's suite, just run); a test the file does not hold is NOT RUN."""
    import xml.etree.ElementTree as ET

    cases = {}
    for case in ET.parse(path).iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.test_x[.TestClass]
        module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
        node = "/".join(parts[:module + 1]) + ".py::" + "::".join(parts[module + 1:] + [case.get("name", "")])
        kinds = {child.tag for child in case}
        outcome = "FAILED" if kinds & {"failure", "error"} else "SKIPPED" if "skipped" in kinds else "PASSED"
        cases.setdefault(node, set()).add(outcome)
    outcomes = {}
    for test in tests:
        seen = set().union(*(o for node, o in cases.items() if node == test or node.startswith(test + "[")))
        outcomes[test] = ("FAILED" if "FAILED" in seen else "PASSED" if "PASSED" in seen
                          else "SKIPPED" if seen else "NOT RUN")
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once, each in its own copy (default 2)")
    parser.add_argument("--baseline", type=Path, metavar="JUNIT_XML",
                        help="take the unmutated outcomes from this pytest --junitxml file of the same code (make "
                             "test: the suite that just ran) instead of running the named tests first")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants: {', '.join(sorted(unknown))} (see --list)")
    if args.list:
        for m in chosen:
            print(f"{m.name:22} src/lmforge/{m.file:18} {' '.join(m.tests)}")
        return 0
    jobs = max(1, args.jobs)
    with tempfile.TemporaryDirectory(prefix="lmforge-mutants-") as tmp:
        copies: queue.Queue[Path] = queue.Queue()  # package parents, one per job: a mutant edits its own copy
        for i in range(jobs):
            shutil.copytree(PACKAGE, Path(tmp) / f"job{i}" / "lmforge", ignore=shutil.ignore_patterns("__pycache__"))
            copies.put(Path(tmp) / f"job{i}")
        for m in chosen:  # every target must be there before anything runs
            target(Path(tmp) / "job0" / "lmforge", m)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        started = time.perf_counter()
        if args.baseline is not None:
            baseline = junit_outcomes(args.baseline, tests)
        else:
            with ThreadPoolExecutor(jobs) as pool:  # the unmutated run split over the jobs' copies (none empty)
                parts = pool.map(lambda part: run_tests(Path(tmp) / f"job{part}", tests[part::jobs]),
                                 range(min(jobs, len(tests))))
                baseline = {test: outcome for part in parts for test, outcome in part.items()}
        broken = {t: o for t, o in baseline.items() if o not in ("PASSED", "SKIPPED")}
        if broken:
            print("the named tests must pass on the unmutated code first:", file=sys.stderr)
            for test, outcome in broken.items():
                print(f"  {outcome}: {test}", file=sys.stderr)
            return 1
        print(f"baseline: {len(tests)} named tests pass " + (f"(in {args.baseline})" if args.baseline else
                                                              f"({time.perf_counter() - started:.0f} s)"))
        def run_mutant(m: Mutant) -> tuple[str, str, str, str, float]:
            """Apply `m` to a free copy, run its tests, undo it: (name, file, failed/named, verdict, seconds)."""
            started, parent = time.perf_counter(), copies.get()
            copy = parent / "lmforge"
            original = target(copy, m)
            (copy / m.file).write_text(original.replace(m.old, m.new), encoding="utf-8")
            try:
                outcomes = run_tests(parent, m.tests)
            finally:
                (copy / m.file).write_text(original, encoding="utf-8")
                copies.put(parent)
            caught = [t for t in m.tests if outcomes[t] == "FAILED"]
            skipped = [t for t in m.tests if outcomes[t] == "SKIPPED" or baseline[t] == "SKIPPED"]
            verdict = "caught" if len(caught) == len(m.tests) else ("not run (skipped here)" if skipped else "SURVIVED")
            return m.name, m.file, f"{len(caught)}/{len(m.tests)}", verdict, time.perf_counter() - started

        with ThreadPoolExecutor(jobs) as pool:
            rows = list(pool.map(run_mutant, chosen))
        survivors = [name for name, _, _, verdict, _ in rows if verdict == "SURVIVED"]
    width, file_width = max(len(r[0]) for r in rows), max(18, *(len(r[1]) for r in rows))
    print(f"{'mutant':{width}}  {'file':{file_width}}  tests failed  verdict                 seconds")
    for name, file, failed, verdict, seconds in rows:
        print(f"{name:{width}}  {file:{file_width}}  {failed:>12}  {verdict:22}  {seconds:7.1f}")
    sys.stdout.flush()
    if survivors:
        print(f"{len(survivors)} mutant(s) survived: {', '.join(survivors)}: a test that names the property does "
              f"not catch its break", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
