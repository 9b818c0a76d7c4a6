"""
Charts: the tool C{chart}.

A read-only query's rows become a bar, line, scatter or histogram chart,
drawn by matplotlib (its Agg canvas, no GUI) and returned inline as MCP
image content (PNG or SVG), written to a file, or both.  matplotlib is
imported when the first chart is drawn, never at the server's start.

What a chart shows is decided by pure functions (L{chart_options} checks
the parameters, L{plotted} turns rows into series); L{draw} only draws.
Dates and timestamps on x are placed by time on line and scatter charts
(unless C{x_as_category}); text is placed as categories, in the order the
query gives; bars are always categories.  Rows with a NULL x or y are left
out and counted.
"""

import base64
import datetime
import decimal
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer

from hyperdaemon.mcp.tools import ToolFailure

CHART_TYPES = ("bar", "line", "scatter", "histogram")
FORMATS = {"png": "image/png", "svg": "image/svg+xml"}
#: Pixels, unless told; and the bounds of what may be asked.
DEFAULT_WIDTH, DEFAULT_HEIGHT = 800, 480
MIN_PIXELS, MAX_PIXELS = 100, 4000
DEFAULT_BINS, MAX_BINS = 20, 1000
#: Rows a chart reads at most; more is an error that says to aggregate.
ROW_LIMIT = 200_000
#: Dots per inch of the canvas: a pixel is 1/DPI of an inch.
DPI = 100


@attrs.frozen
class ChartOptions:
    """A chart's parameters, checked (L{chart_options})."""

    chart_type: str
    x: str
    y: str | None
    series: str | None
    title: str | None
    format: str
    width: int
    height: int
    bins: int
    x_as_category: bool
    horizontal: bool
    x_range: tuple[float, float] | None
    y_range: tuple[float, float] | None
    log: bool
    colors: dict[str, str]
    label_points: bool
    label_values: bool
    show_legend: bool


def _whole(name: str, value: Any, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ToolFailure(f"{name}: {value!r} is out of range; give a whole number from {low} "
                          f"to {high} (default {default})")
    return value


def _extent(name: str, value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not all(math.isfinite(v) for v in value) or not value[0] < value[1]):
        raise ToolFailure(f"{name}: {value!r} is not an extent; give two finite numbers, the "
                          f"lower first, e.g. [0, 100]")
    return float(value[0]), float(value[1])


def _choice(name: str, value: Any, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    chosen = value.lower() if isinstance(value, str) else value
    if chosen not in choices:
        raise ToolFailure(f"{name}: {value!r} is not one of {', '.join(choices)}; give one of "
                          f"those (default {default})")
    return chosen


def chart_options(chart_type: Any, x: Any = None, y: Any = None, series: Any = None,
                  title: Any = None, format: Any = None, width: Any = None,
                  height: Any = None, bins: Any = None, x_as_category: Any = None,
                  bar_orientation: Any = None, x_range: Any = None, y_range: Any = None,
                  y_scale: Any = None, color_map: Any = None, label_points: Any = None,
                  label_values: Any = None, show_legend: Any = None,
                  output_path: Any = None) -> ChartOptions:
    """
    The checked options of a chart.  Pure.

    @raise ToolFailure: naming the first parameter at fault and what to give.
    """
    kind = chart_type.lower() if isinstance(chart_type, str) else chart_type
    if kind not in CHART_TYPES:
        raise ToolFailure(f"chart_type: {chart_type!r} is not a chart this tool draws; give "
                          f"one of {', '.join(CHART_TYPES)}")
    if not isinstance(x, str) or not x:
        what = "the column of values to count" if kind == "histogram" else "the x column"
        raise ToolFailure(f"x: a {kind} chart needs x, {what}, named as the query's result "
                          f"names it")
    if kind == "histogram":
        if y is not None:
            raise ToolFailure("y: a histogram counts the values of x and takes no y; leave y "
                              "out")
    elif not isinstance(y, str) or not y:
        raise ToolFailure(f"y: a {kind} chart needs y, the column of numbers to plot, named "
                          f"as the query's result names it")
    if series is not None and (not isinstance(series, str) or not series):
        raise ToolFailure("series: give the name of a column of the query, or leave series out")
    if bar_orientation is not None and kind != "bar":
        raise ToolFailure(f"bar_orientation: only bar charts have one, and this is a {kind} "
                          f"chart; leave it out")
    orientation = _choice("bar_orientation", bar_orientation, ("vertical", "horizontal"),
                          "vertical")
    if bins is not None and kind != "histogram":
        raise ToolFailure(f"bins: only histograms have bins, and this is a {kind} chart; "
                          f"leave it out")
    scale = _choice("y_scale", y_scale, ("linear", "log"), "linear")
    if scale == "log" and kind == "histogram":
        raise ToolFailure("y_scale: a histogram's counts are drawn on a linear scale only; "
                          "leave y_scale out, or chart counts computed in SQL as a bar chart")
    fmt = _choice("format", format, tuple(FORMATS), "png")
    if isinstance(output_path, str) and output_path:
        suffix = Path(output_path).suffix.lower().lstrip(".")
        if suffix not in FORMATS:
            raise ToolFailure(f"output_path: name the file .png or .svg (it ends in "
                              f"{Path(output_path).suffix or 'no extension'})")
        if format is None:
            fmt = suffix
        elif suffix != fmt:
            raise ToolFailure(f"output_path: the file ends in .{suffix} and format is "
                              f"{fmt!r}; make them agree")
    colors = color_map or {}
    if not isinstance(colors, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in colors.items()):
        raise ToolFailure("color_map: give an object from series value to colour, e.g. "
                          "{\"Lyon\": \"#e41a1c\"}")
    from matplotlib.colors import is_color_like

    wrong = [name for name, colour in colors.items() if not is_color_like(colour)]
    if wrong:
        raise ToolFailure(f"color_map: {colors[wrong[0]]!r} (for {wrong[0]!r}) is not a "
                          f"colour; give colours as \"#rrggbb\" or a name such as \"red\"")
    if colors and series is None:
        raise ToolFailure("color_map: colours are given per series, and series is not set; "
                          "set series, or leave color_map out")
    if label_points and kind not in ("line", "scatter"):
        raise ToolFailure(f"label_points: only line and scatter charts label their points, and "
                          f"this is a {kind} chart; use label_values for bars")
    if label_points and series is None:
        raise ToolFailure("label_points: points are labelled with their series, and series "
                          "is not set; set series, or leave label_points out")
    if label_values and kind != "bar":
        raise ToolFailure(f"label_values: only bar charts label their values, and this is a "
                          f"{kind} chart; leave it out")
    if title is not None and not isinstance(title, str):
        raise ToolFailure("title: give the title as text, or leave it out")
    return ChartOptions(
        chart_type=kind, x=x, y=y, series=series, title=title, format=fmt,
        width=_whole("width", width, DEFAULT_WIDTH, MIN_PIXELS, MAX_PIXELS),
        height=_whole("height", height, DEFAULT_HEIGHT, MIN_PIXELS, MAX_PIXELS),
        bins=_whole("bins", bins, DEFAULT_BINS, 1, MAX_BINS),
        x_as_category=bool(x_as_category), horizontal=orientation == "horizontal",
        x_range=_extent("x_range", x_range), y_range=_extent("y_range", y_range),
        log=scale == "log", colors=dict(colors), label_points=bool(label_points),
        label_values=bool(label_values),
        show_legend=True if show_legend is None else bool(show_legend))


# -- rows into series ----------------------------------------------------------------

def value_kind(values: list[Any]) -> str:
    """C{number}, C{time} or C{text}: what a column's non-NULL values are. Pure."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float, decimal.Decimal))
                       and not isinstance(v, bool) for v in present):
        return "number"
    if present and all(isinstance(v, (datetime.date, datetime.datetime)) for v in present):
        return "time"
    return "text"


def _label(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return str(value)


@attrs.frozen
class Plotted:
    """What L{plotted} made of the rows: the series to draw and how x is placed."""

    #: Series name (None without series) -> list of (x, y) pairs; y is None
    #: for a histogram.
    series: dict[str | None, list[tuple[Any, Any]]]
    #: How x is placed: C{number}, C{time} or C{category}.
    x_axis: str
    #: The categories of x, in the order the rows gave them (category axes).
    categories: list[str]
    rows_plotted: int
    rows_skipped: int
    notes: list[str]


def plotted(columns: list[str], rows: list[tuple[Any, ...]], options: ChartOptions) -> Plotted:
    """
    The series of a chart from a query's C{columns} and C{rows}.  Pure.

    @raise ToolFailure: for a column the query does not give, a y (or a
        histogram's x) that is not numbers, or an extent x cannot take.
    """
    where = {}
    for parameter in ("x", "y", "series"):
        name = getattr(options, parameter)
        if name is None:
            continue
        if name not in columns:
            raise ToolFailure(f"{parameter}: the query gives no column {name!r} (its columns: "
                              f"{', '.join(map(repr, columns))}); give one of those, or rename "
                              f"a column in the SQL with AS")
        where[parameter] = columns.index(name)
    kind = options.chart_type
    if not any(row[where["x"]] is not None
               and (kind == "histogram" or row[where["y"]] is not None) for row in rows):
        why = " (each has a NULL x or y)" if rows else ""
        raise ToolFailure(f"sql: the query gives {len(rows)} row(s) and none to plot{why}; "
                          f"check its WHERE clause, or the columns given as x and y")
    xs = [row[where["x"]] for row in rows]
    x_kind = value_kind(xs)
    if kind == "histogram" and x_kind != "number":
        raise ToolFailure(f"x: a histogram counts numbers, and column {options.x!r} holds "
                          f"{'dates or times' if x_kind == 'time' else 'text'}; cast it in the "
                          f"SQL (e.g. extract(epoch FROM ...)), or use a bar chart of counts")
    if kind != "histogram":
        ys = [row[where["y"]] for row in rows]
        if value_kind(ys) != "number" and any(v is not None for v in ys):
            raise ToolFailure(f"y: column {options.y!r} holds values that are not numbers; "
                              f"chart a numeric column, or cast it in the SQL "
                              f"(CAST(... AS DOUBLE PRECISION))")
    if kind == "bar" or options.x_as_category or x_kind == "text":
        axis = "category"
    else:
        axis = x_kind
    notes: list[str] = []
    if options.x_range is not None:
        if kind == "bar":
            notes.append("x_range is not used by bar charts, whose x are categories")
        elif axis != "number":
            placed = "time" if axis == "time" else "categories"
            raise ToolFailure(f"x_range: x is placed as {placed}, and x_range takes numbers; "
                              f"filter the rows in the SQL instead, or leave x_range out")
    series: dict[str | None, list[tuple[Any, Any]]] = {}
    categories: dict[str, None] = {}
    skipped = 0
    for row in rows:
        x = row[where["x"]]
        y = None if kind == "histogram" else row[where["y"]]
        if x is None or (kind != "histogram" and y is None):
            skipped += 1
            continue
        if kind != "histogram":
            y = float(y)
            if not math.isfinite(y):
                skipped += 1
                continue
        if axis == "category":
            x = _label(x)
            categories.setdefault(x)
        elif axis == "number":
            x = float(x)
            if not math.isfinite(x):
                skipped += 1
                continue
        name = _label(row[where["series"]]) if "series" in where else None
        series.setdefault(name, []).append((x, y))
    if not series:
        raise ToolFailure(f"sql: the query gives {len(rows)} row(s) and none with finite "
                          f"values to plot; check its WHERE clause, or the columns given as x "
                          f"and y")
    if options.log:
        low = min((y for points in series.values() for _, y in points), default=1.0)
        if low <= 0:
            raise ToolFailure(f"y_scale: a log scale shows only values above 0, and y goes down "
                              f"to {low:g}; filter those rows in the SQL, or use y_scale "
                              f"'linear'")
        if options.y_range is not None and options.y_range[0] <= 0:
            raise ToolFailure("y_range: a log scale starts above 0; give a lower end above 0")
    if kind == "bar":
        for name, points in series.items():
            summed: dict[str, float] = {}
            for x, y in points:
                summed[x] = summed.get(x, 0.0) + y
            if len(summed) < len(points):
                notes.append("rows with the same x (and series) were added up into one bar")
            series[name] = list(summed.items())
    if kind == "line" and axis != "category":
        for points in series.values():
            points.sort(key=lambda p: p[0])
    if skipped:
        notes.append(f"{skipped} row(s) with a NULL (or infinite) x or y were left out")
    plotted_rows = sum(len(points) for points in series.values())
    return Plotted(series, axis, list(categories), plotted_rows, skipped,
                   list(dict.fromkeys(notes)))


# -- drawing -------------------------------------------------------------------------

def draw(plot: Plotted, options: ChartOptions) -> bytes:
    """The chart as PNG or SVG bytes (matplotlib's Agg canvas; safe in a thread)."""
    import io

    import matplotlib

    # SVG ids are random unless salted: the same chart must give the same file.
    matplotlib.rcParams["svg.hashsalt"] = "hyperdb-chart"
    out = io.BytesIO()
    figure(plot, options).savefig(out, format=options.format,
                                  metadata=_no_dates(options.format))
    return out.getvalue()


def figure(plot: Plotted, options: ChartOptions) -> Any:
    """The chart as a matplotlib C{Figure} on an Agg canvas, drawn but not saved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = Figure(figsize=(options.width / DPI, options.height / DPI), dpi=DPI)
    FigureCanvasAgg(drawn)
    axes = drawn.add_subplot()
    names = list(plot.series)
    colors = {}
    for index, name in enumerate(names):
        given = options.colors.get(name) if name is not None else None
        colors[name] = given or f"C{index % 10}"  # the standard palette's colours
    labelled = options.series is not None
    kind = options.chart_type
    position = {c: i for i, c in enumerate(plot.categories)}
    if kind == "bar":
        width = 0.8 / max(len(names), 1)
        for index, name in enumerate(names):
            points = plot.series[name]
            offset = (index - (len(names) - 1) / 2) * width
            at = [position[x] + offset for x, _ in points]
            heights = [y for _, y in points]
            draw_bars = axes.barh if options.horizontal else axes.bar
            bars = draw_bars(at, heights, width, color=colors[name],
                             label=name if labelled else None)
            if options.label_values:
                axes.bar_label(bars, labels=[f"{y:g}" for y in heights], fontsize=8)
        ticks = list(range(len(plot.categories)))
        if options.horizontal:
            axes.set_yticks(ticks, plot.categories)
        else:
            rotate = len(plot.categories) > 8 or max(map(len, plot.categories), default=0) > 10
            axes.set_xticks(ticks, plot.categories, rotation=45 if rotate else 0,
                            ha="right" if rotate else "center")
    elif kind == "histogram":
        values = [[x for x, _ in plot.series[name]] for name in names]
        axes.hist(values, bins=options.bins, color=[colors[n] for n in names],
                  label=names if labelled else None)
    else:
        for name in names:
            points = plot.series[name]
            xs = [position[x] if plot.x_axis == "category" else x for x, _ in points]
            ys = [y for _, y in points]
            if kind == "line":
                axes.plot(xs, ys, color=colors[name], label=name if labelled else None,
                          marker="o" if len(xs) <= 50 else None, markersize=3)
            else:
                axes.scatter(xs, ys, color=colors[name], label=name if labelled else None, s=12)
            if options.label_points:
                for px, py in zip(xs, ys):
                    axes.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4),
                                  fontsize=8)
        if plot.x_axis == "category":
            ticks = list(range(len(plot.categories)))
            rotate = len(plot.categories) > 8
            axes.set_xticks(ticks, plot.categories, rotation=45 if rotate else 0,
                            ha="right" if rotate else "center")
        elif plot.x_axis == "time":
            drawn.autofmt_xdate()
    measure_x = kind == "bar" and options.horizontal
    if options.log:
        (axes.set_xscale if measure_x else axes.set_yscale)("log")
    if options.y_range is not None:
        (axes.set_xlim if measure_x else axes.set_ylim)(*options.y_range)
    if options.x_range is not None and kind != "bar":
        axes.set_xlim(*options.x_range)
    x_name, y_name = options.x, options.y or "count"
    if measure_x:
        x_name, y_name = y_name, x_name
    axes.set_xlabel(x_name)
    axes.set_ylabel(y_name)
    if options.title:
        axes.set_title(options.title)
    legend = labelled and options.show_legend and not options.label_points
    if legend and names:
        axes.legend(title=options.series, fontsize=8)
    axes.grid(True, alpha=0.3)
    drawn.tight_layout()
    return drawn


def _no_dates(fmt: str) -> dict[str, Any]:
    # The same chart twice gives the same bytes: no creation date inside.
    return {"Date": None} if fmt == "svg" else {}


# -- the tool ------------------------------------------------------------------------

def _fetch(tools: Any, sql: str, db: str) -> defer.Deferred[tuple[list[str], list[Any]]]:
    """The columns and rows of C{sql} (read-only, rolled back), at most L{ROW_LIMIT}."""
    from hyperdaemon.mcp.tools import (_exact_floats, _require_read_only, _result_cursor,
                                       _search_path)

    if not isinstance(sql, str) or not sql.strip():
        raise ToolFailure("sql: give one read-only query (SELECT, WITH or VALUES) whose rows "
                          "to chart")

    def work(conn: Any) -> tuple[list[str], list[Any]]:
        with _search_path(conn, db):
            _require_read_only(conn, sql)
            _exact_floats(conn)
            with conn.transaction(force_rollback=True):
                cursor = _result_cursor(conn)
                cursor.execute(sql)
                if cursor.description is None:
                    raise ToolFailure("sql: the statement gives no rows; give a query")
                columns = [c.name for c in cursor.description]
                rows = cursor.fetchmany(ROW_LIMIT + 1)
        if len(rows) > ROW_LIMIT:
            raise ToolFailure(f"sql: the query gives more than {ROW_LIMIT:,} rows, more than a "
                              f"chart can show; aggregate in the SQL (GROUP BY, or "
                              f"width_bucket for a histogram) or add a LIMIT")
        return columns, rows

    return tools._call(work, writes=False, parameter="sql")


def _target(tools: Any, output_path: str | None, inline: bool, fmt: str,
            overwrite: bool) -> Path | None:
    """Where to write the chart (None: nowhere), if it may be written there."""
    if not output_path:
        if inline:
            return None
        handle, made = tempfile.mkstemp(prefix="hyperdb-chart-", suffix=f".{fmt}")
        os.close(handle)
        return Path(made)
    target = Path(os.path.abspath(os.path.expanduser(output_path)))
    for alias, database in tools._database_files():
        if os.path.lexists(target) and os.path.samefile(target, database):
            raise ToolFailure(f"output_path: {target} is the file of the database {alias!r}; "
                              f"choose another path")
    if target.is_dir():
        raise ToolFailure(f"output_path: {target} is a folder; give a file name in it")
    if os.path.lexists(target):
        if tools.read_only:
            raise ToolFailure(f"output_path: {target} exists, and with --read-only no file is "
                              f"replaced; choose a new path")
        if not overwrite:
            raise ToolFailure(f"output_path: {target} exists and overwrite is false; choose a "
                              f"new path, or pass overwrite=true")
    return target


def _write(image: bytes, target: Path, overwrite: bool) -> None:
    """Put C{image} at C{target} in one step: a partial file is never seen there."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Made with the mode a new file gets (0644 under the umask), where
        # mkstemp would make it 0600; the random name keeps it private to us.
        written = str(target.parent / f".{target.name}.{secrets.token_hex(8)}")
        handle = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise ToolFailure(f"output_path: cannot write in {target.parent} ({e.strerror}); "
                          f"choose a folder this user can write in") from None
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(image)
            f.flush()
            os.fsync(f.fileno())  # on disk before its name is
        if overwrite:
            os.replace(written, target)
        else:
            os.link(written, target)  # never replaces a file that appeared meanwhile
    except FileExistsError:
        raise ToolFailure(f"output_path: {target} appeared meanwhile; choose a new path, or "
                          f"pass overwrite=true") from None
    finally:
        if os.path.lexists(written):
            os.unlink(written)


def make_chart(tools: Any, keep: dict[str, Any], sql: str, chart_type: str,
               database: str | None = None, output_path: str | None = None,
               inline: bool | None = None, overwrite: bool | None = None,
               **choices: Any) -> defer.Deferred[dict[str, Any]]:
    """
    Chart C{sql}'s rows; fires with what was drawn, and puts the image (and
    its MIME type) in C{keep} when it is to be returned inline.
    """
    from twisted.internet.threads import deferToThread

    options = chart_options(chart_type, output_path=output_path, **choices)
    inline = True if inline is None else bool(inline)
    overwrite = True if overwrite is None else bool(overwrite)
    db = tools._database(database)
    target = _target(tools, output_path, inline, options.format, overwrite)

    def chart(fetched: tuple[list[str], list[Any]]) -> defer.Deferred[dict[str, Any]]:
        plot = plotted(*fetched, options)

        def drawn_and_written() -> bytes:
            # Both block (the file is synced): off the reactor thread.
            image = draw(plot, options)
            if target is not None:
                _write(image, target, overwrite)
            return image

        return deferToThread(drawn_and_written).addCallback(done, plot)

    def done(image: bytes, plot: Plotted) -> dict[str, Any]:
        if inline:
            keep.update(data=base64.b64encode(image).decode("ascii"),
                        mime_type=FORMATS[options.format])
        facts: dict[str, Any] = {
            "chart_type": options.chart_type, "format": options.format,
            "rows_plotted": plot.rows_plotted, "rows_skipped": plot.rows_skipped,
            "series": len(plot.series) if options.series else 0, "x_axis": plot.x_axis,
            "width": options.width, "height": options.height, "bytes": len(image),
            "inline": inline, "database": db}
        if target is not None:
            facts["output_path"] = str(target)
        if plot.notes:
            facts["notes"] = plot.notes
        return facts

    return _fetch(tools, sql, db).addCallback(chart)


def register(kit: Any) -> None:
    from typing import Annotated

    from mcp.types import CallToolResult, ImageContent
    from pydantic import Field

    from hyperdaemon.mcp import server

    tools, Arg = kit.tools, kit.arg

    class Charted(kit.Result):
        """The chart drawn (the image itself comes first in the content, when inline)."""

        chart_type: str
        format: str = Field(description="`png` or `svg`.")
        rows_plotted: int = Field(description="Points, bars or values drawn.")
        rows_skipped: int = Field(description="Rows left out for a NULL x or y.")
        series: int = Field(description="How many series were drawn (0 without series).")
        x_axis: str = Field(description="How x was placed: `number`, `time` (spaced by "
                                        "time) or `category`.")
        width: int
        height: int
        bytes: int = Field(description="The image's size.")
        inline: bool = Field(description="Whether the image is in this result.")
        database: str
        output_path: str | None = Field(None, description="The file written, if any.")
        notes: list[str] | None = Field(None, description="What was left out or combined.")

    @kit.tool("Chart a query", kit.hints(read_only=False, destructive=True, idempotent=True))
    async def chart(
        sql: Arg(str, "A read-only query (SELECT, WITH or VALUES) whose rows to chart, in "
                      "long form: one row per point or bar, with series as a column."),
        chart_type: Arg(str, "The kind of chart: `bar`, `line`, `scatter` or `histogram`."),
        x: Arg(str | None, "The column placed along x; for a histogram, the column of numbers "
                           "counted. Needed by every chart type; no default.") = None,
        y: Arg(str | None, "The column of numbers plotted up the y axis. Needed by bar, line "
                           "and scatter, and not taken by histogram; no default.") = None,
        series: Arg(str | None, "A column whose values split the rows into series, each drawn "
                                "in its own colour with a legend. Default: one series.") = None,
        title: Arg(str | None, "The title drawn above the chart. Default: none.") = None,
        format: Arg(str | None, "The image format: `png` or `svg`. Default png, or what "
                                "output_path ends in.") = None,
        width: Arg(int | None, f"The image's width in pixels, from {MIN_PIXELS} to "
                               f"{MAX_PIXELS}. Default {DEFAULT_WIDTH}.") = None,
        height: Arg(int | None, f"The image's height in pixels, from {MIN_PIXELS} to "
                                f"{MAX_PIXELS}. Default {DEFAULT_HEIGHT}.") = None,
        bins: Arg(int | None, f"How many bins a histogram has, from 1 to {MAX_BINS} "
                              f"(histogram only). Default {DEFAULT_BINS}.") = None,
        x_as_category: Arg(bool | None, "Whether to place x values evenly, as categories in "
                                        "the order of the rows, even when they are numbers "
                                        "or dates. Default false: numbers by value, dates "
                                        "and times by time.") = None,
        bar_orientation: Arg(str | None, "How bars lie: `vertical` or `horizontal` (bar "
                                         "charts only). Default vertical.") = None,
        x_range: Arg(list[float] | None, "The x axis's extent as [low, high], for numeric x "
                                         "(bars ignore it). Default: fitted to the "
                                         "data.") = None,
        y_range: Arg(list[float] | None, "The extent of the y measure as [low, high] (for "
                                         "horizontal bars, drawn across). Default: fitted to "
                                         "the data.") = None,
        y_scale: Arg(str | None, "The scale of the y measure: `linear` or `log` (values "
                                 "above 0 only; not for histograms). Default linear.") = None,
        color_map: Arg(dict[str, str] | None, "Colours of series by value, as an object, e.g. "
                                              "{\"Lyon\": \"#e41a1c\"}; needs series. "
                                              "Default: the standard palette.") = None,
        label_points: Arg(bool | None, "Whether to write each point's series beside it on "
                                       "line and scatter charts, instead of a legend. Default "
                                       "false.") = None,
        label_values: Arg(bool | None, "Whether to write each bar's value beside it (bar "
                                       "charts only). Default false.") = None,
        show_legend: Arg(bool | None, "Whether to draw the legend of the series. Default "
                                      "true.") = None,
        output_path: Arg(str | None, "A file to write the image to, by absolute path ending "
                                     "in .png or .svg; missing folders are made. Default: no "
                                     "file.") = None,
        inline: Arg(bool | None, "Whether the image is returned in the result. Default true; "
                                 "false without output_path writes a file in the system's "
                                 "temporary folder.") = None,
        overwrite: Arg(bool | None, "Whether to replace a file at output_path (never with "
                                    "--read-only). Default true.") = None,
        database: Arg(str | None, server.DATABASE) = None,
    ) -> Annotated[CallToolResult, Charted]:
        """
        Draw a bar, line, scatter or histogram chart of a read-only query's rows
        and return it as an image (PNG or SVG), write it to a file, or both.
        Dates and times on x are spaced by time; text on x is shown as
        categories.
        """
        image: dict[str, Any] = {}
        made = await kit.call(
            make_chart, tools=tools, keep=image, sql=sql, chart_type=chart_type,
            database=database, output_path=output_path, inline=inline, overwrite=overwrite,
            x=x, y=y, series=series, title=title, format=format, width=width, height=height,
            bins=bins, x_as_category=x_as_category, bar_orientation=bar_orientation,
            x_range=x_range, y_range=y_range, y_scale=y_scale, color_map=color_map,
            label_points=label_points, label_values=label_values, show_legend=show_legend)
        if image:
            made.content.insert(0, ImageContent(type="image", **image))
        return made
