"""The paper-style figure: sampled LEO regressors on held-out tasks.

One panel per task: the true function, the K support points, the regressors
of several independently sampled LEO adaptations (sampled latent codes and
parameters) and MAML's adapted regressor. Needs matplotlib
(`pip install ".[plots]"`); `available()` says whether it is installed.
"""

import importlib.util
import io

_PANEL_INCHES = 3.0
_DPI = 80


def available():
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def render_png(grid, truth, support_x, support_y, leo_samples, maml):
    """The figure as PNG bytes, 3 x 3 inches at 80 dpi per panel.

    Args:
      grid: [G] inputs at which the curves are drawn.
      truth: [F, G] the true functions of F tasks.
      support_x, support_y: [F, K] their support points.
      leo_samples: [S, F, G] S sampled LEO predictions per task.
      maml: [F, G] MAML's predictions.
    """
    # pylint: disable=g-import-not-at-top
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # pylint: enable=g-import-not-at-top
    count = len(truth)
    figure = Figure(figsize=(_PANEL_INCHES * count, _PANEL_INCHES), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, count, squeeze=False)[0]
    for task, ax in enumerate(axes):
        for index, sample in enumerate(leo_samples[:, task]):
            ax.plot(
                grid,
                sample,
                color="tab:blue",
                alpha=0.5,
                linewidth=1,
                label="LEO samples" if index == 0 else None,
            )
        ax.plot(grid, maml[task], color="tab:orange", linestyle="--", label="MAML")
        ax.plot(grid, truth[task], color="black", linewidth=1.5, label="true")
        ax.scatter(
            support_x[task], support_y[task], color="red", zorder=3, label="support"
        )
        ax.set_xlabel("x")
        # Framed on the task, so that a wild sample cannot flatten the rest.
        low = min(truth[task].min(), support_y[task].min())
        high = max(truth[task].max(), support_y[task].max())
        margin = 0.25 * (high - low) + 0.5
        ax.set_ylim(low - margin, high + margin)
    axes[0].legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    stream = io.BytesIO()
    figure.savefig(stream, format="png", dpi=_DPI)
    return stream.getvalue()
