"""Evaluation: grade metrics, bootstrap intervals, significance tests, reports.

  metrics       balanced accuracy, quadratic kappa, MSE, weighted F1,
                confusion matrix, ROC AUC / average precision of grade >= t
                (KL >= 2)
  heads         the metrics of a model with several heads, knees a head does
                not grade left out
  bootstrap     stratified bootstrap percentile intervals (and knee-clustered
                ones for binary findings pooled over heads)
  significance  chunked Wilcoxon signed-rank test (Semixup), McNemar test
  plots         confusion matrix, ROC, precision-recall and sorted
                confidence PNGs
  readers       the model against human readers: accuracy, sensitivity,
                specificity, kappa, exact McNemar test
  gradcam       Grad-CAM / HiResCAM of any model, head and layer, laid back
                onto the knee ROI, and overlay PNGs
  predictions   predictions.csv: writing, reading, recomputing metrics
  report        predictions.csv + metrics.json + figures of one run
  heads_table   the per-head table of a multi-head report (markdown + PNG)
  compare       CLI: python -m koajax.evaluation.compare --a=... --b=...
"""

from koajax.evaluation.bootstrap import Interval
from koajax.evaluation.bootstrap import stratified_ci
from koajax.evaluation.heads import head_scores
from koajax.evaluation.metrics import classification_metrics
from koajax.evaluation.metrics import kl_metrics
from koajax.evaluation.metrics import MetricSet
from koajax.evaluation.predictions import metrics_from_predictions
from koajax.evaluation.predictions import read_predictions
from koajax.evaluation.report import write_report
from koajax.evaluation.significance import chunked_wilcoxon
from koajax.evaluation.significance import mcnemar
