"""What each kind of figure draws, for the HTML report and `snakemake --report` alike.

A module of its own, without plotting imports: the workflow reads it while it plans.
"""

ERROR_BANDS = "Points and lines are means over seeds; bands and bars are 95% bootstrap intervals over seeds."
# One caption per kind of figure, for this page and for `snakemake --report` alike.
FIGURE_CAPTIONS = {
    "accuracy": "Final test accuracy of each cell against the study's main axis, one colour per norm; diverged "
                "cells are red crosses at zero. " + ERROR_BANDS,
    "curves": "Test accuracy at each evaluation during training, one panel per value of the study's main axis. "
              + ERROR_BANDS,
    "gradient_profile": "Gradient norm of each weighted layer's weight on the first training step, at "
                        "initialization, from the input side (left) to the output (right), on a log scale: a "
                        "falling line toward the input is a vanishing gradient; a cell that diverged on its "
                        "first step has none. " + ERROR_BANDS,
    "saturation": "Share of sigmoid units within 5% of 0 or 1 (saturated) or of ReLU units that are zero for the "
                  "whole batch (dead) on the first training step, averaged over layers. " + ERROR_BANDS,
    "throughput": "Training throughput in images per second, measured over each cell's timed training steps "
                  "(evaluation excluded). " + ERROR_BANDS,
}
