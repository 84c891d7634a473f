"""The embedded testbed: a small, real text-to-image world that ships inside the package.

scikit-learn's handwritten digits are the data; a diffusers
StableDiffusionPipeline trained on them (`python -m rewardkit.testbed.train`)
is the teacher; a CNN classifier trained on one split is the reward
`digit_classifier`; an MLP trained on a disjoint split with another seed is
the independent evaluator (accuracy, Frechet distance on its features,
diversity). The trained weights ship in `rewardkit/testbed/weights/`
(about 3 MB), so `rewardkit run quickstart` trains only the generator.

Recipes refer to the packaged weights by the reserved name
``"rewardkit-testbed"`` (`data.PACKAGED`, the default of every testbed plugin's `model` /
`weights` option); a folder written by `python -m rewardkit.testbed.train
--out DIR` can be given instead, or set for all plugins at once with the
environment variable REWARDKIT_TESTBED_WEIGHTS=DIR.

This module is the testbed's default plugin module: it registers the
`testbed` generator and the digit rewards, the `rewardkit testbed-report`
command, and the table printed when `rewardkit run` ends on the testbed.
Everything heavy is imported only when a hook runs.
"""

from rewardkit.hookspecs import hookimpl


@hookimpl
def register_generators(register):
    from rewardkit.testbed.plugins import TestbedGenerator

    register(TestbedGenerator)


@hookimpl
def register_rewards(register):
    from rewardkit.testbed.plugins import DigitClassifier, DigitCorrect, DigitPrototype, DigitRealism

    register(DigitClassifier)
    register(DigitRealism)
    register(DigitPrototype)
    register(DigitCorrect)


def _report_arguments(parser):
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run on the testbed generator")
    parser.add_argument("--per-digit", type=int, default=None, help="samples per digit (default: the recipe's report_samples_per_digit)")


def _report_command(args, registry) -> int:
    from rewardkit.testbed.evaluate import report_run

    print(report_run(args.run_dir, registry=registry, per_digit=args.per_digit))
    return 0


@hookimpl
def register_commands(register):
    register(
        "testbed-report", _report_command, _report_arguments,
        help="evaluate a testbed run: teacher vs trained generator with the independent evaluator",
    )


@hookimpl
def run_finished(run_dir, recipe, registry):
    """After `rewardkit run` on the `testbed` generator: the evaluation table (unless generator.report = false)."""
    from rewardkit.testbed.plugins import TestbedGenerator

    options = recipe.generator.options
    if not issubclass(recipe.generator.cls, TestbedGenerator) or not options.report or options.training == "noise":
        return None
    from rewardkit.testbed.evaluate import report_run

    return report_run(run_dir, registry=registry)
