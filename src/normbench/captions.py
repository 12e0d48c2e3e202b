"""What each kind of figure draws, for the HTML report and `snakemake --report` alike.

A module of its own, without plotting imports: the workflow reads it while it plans.
"""

ERROR_BANDS = ("Points and lines are means over seeds; bands and bars are 95% Student t intervals over seeds, as in the "
               "claims table, clipped to the quantity's range (accuracies and shares to [0, 1], a cosine or an "
               "accuracy gap to [-1, 1]).")
LOG_BANDS = ("On a log axis, lines are geometric means over seeds and bands the 95% Student t intervals of the "
             "logarithms, so that they stay positive.")
# One caption per kind of figure, for this page and for `snakemake --report` alike.
FIGURE_CAPTIONS = {
    "accuracy": "Final test accuracy of each cell against the study's main axis, one colour per norm; diverged "
                "cells are red crosses at zero, left out of the means (the claims and the leaderboard count them "
                "at chance). " + ERROR_BANDS,
    "curves": "Test accuracy at each evaluation during training, one panel per value of the study's main axis. "
              + ERROR_BANDS,
    "gradient_profile": "Gradient norm of each weighted layer's weight on the first training step, at "
                        "initialization, from the input side (left) to the output (right), on a log scale: a "
                        "falling line toward the input is a vanishing gradient; a cell that diverged on its "
                        "first step has none. " + LOG_BANDS,
    "saturation": "Share of sigmoid units within 5% of 0 or 1 (saturated) or of ReLU units that are zero for the "
                  "whole batch (dead) on the first training step, averaged over layers. " + ERROR_BANDS,
    "percentiles": "The 15th, 50th and 85th percentiles of the input to the first sigmoid of the last hidden layer, "
                   "over 1,000 fixed test images at each evaluation (eval mode), without and with BN, for the first "
                   "seed, as in the paper's Figure 1(b, c); the panels have their own y scales. The table below gives "
                   "the drift C1 reads: each percentile's range over training in widths (85th minus 15th "
                   "percentile) of the distribution, over 8 units and every seed.",
    "ics": "Internal covariate shift of each weighted layer (Santurkar et al. 2018): G is the layer's weight "
           "gradient on a training batch, G' the same after every earlier layer took a plain gradient step on that "
           "batch; each cell's mean over its probed steps. " + ERROR_BANDS + " " + LOG_BANDS,
    "landscape": "Along the gradient g at each probed step, at 0.5, 1, 2 and 4 learning rates: the range of the "
                 "loss, and the effective beta-smoothness, the largest gradient change per distance moved (log "
                 "scale; smaller: smoother). " + LOG_BANDS,
    "inference": "Test accuracy of each trained model with its running (EMA) BN statistics, with precise-BN "
                 "statistics recomputed over the training set with frozen weights, and with each test batch's "
                 "own statistics (at the cell's batch size). " + ERROR_BANDS,
    "generalization": "Train accuracy (eval mode, after training, over the whole training subset) minus test "
                      "accuracy, per norm and dropout; ghostbn normalizes over ghost batches. " + ERROR_BANDS,
    "throughput": "Training throughput in images per second, measured over each cell's timed training steps "
                  "(evaluation excluded). Diverged cells are left out: their steps past the divergence, timed up "
                  "to the check that caught it, say nothing of the norm's speed. " + ERROR_BANDS,
}
