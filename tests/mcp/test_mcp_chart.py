"""
The chart tool: through the MCP SDK's stdio client on the real daemon and
hyperd, over a 1,000-row file with dates, NULLs and quoted text; and its
pure parts (options, rows into series, the drawing) on their own.
"""

from __future__ import annotations

import base64
import datetime
import io
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from hyperdaemon.mcp import chart
from hyperdaemon.mcp.tools import ToolFailure
from mcp_support import McpTestCase, ToolCallError
from support import QUICK

from test_mcp_watch import write_rows


def png_size(data: bytes) -> tuple[int, int]:
    """The size of a PNG, read by Pillow (which fails on anything but a whole image)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


class ChartTestCase(McpTestCase):
    @pytest.fixture(autouse=True)
    def _data(self, _tmp: None) -> None:
        self.events = self.tmp / "events.csv"
        self.facts = write_rows(self.events, 1000)

    async def loaded(self, s: Any) -> None:
        await self.call(s, "load_file", table="events", path=str(self.events))

    async def chart(self, s: Any, **arguments: Any) -> tuple[Any, dict[str, Any]]:
        """The image content (or None) and the structured result of a chart call."""
        result = await s.call_tool("chart", arguments)
        if result.is_error:
            raise ToolCallError(result.content[0].text)
        images = [c for c in result.content if c.type == "image"]
        return (images[0] if images else None), result.structured_content


class ChartTypeTests(ChartTestCase):
    def test_each_chart_type_returns_a_decodable_png(self) -> None:
        async def go() -> dict[str, Any]:
            async with self.server() as s:
                await self.loaded(s)
                made = {}
                for kind, arguments in [
                    ("bar", {"sql": "SELECT note LIKE 'line%' AS multiline, "
                                    "extract(month FROM day) AS month, sum(amount) AS total "
                                    "FROM events GROUP BY 1, 2 ORDER BY 2",
                             "x": "month", "y": "total", "series": "multiline",
                             "label_values": True}),
                    ("line", {"sql": "SELECT day, amount FROM events", "x": "day",
                              "y": "amount", "title": "Amount by day"}),
                    ("scatter", {"sql": "SELECT id, amount, note FROM events WHERE id < 40",
                                 "x": "id", "y": "amount", "series": "note",
                                 "label_points": True}),
                    ("histogram", {"sql": "SELECT amount FROM events", "x": "amount",
                                   "bins": 30}),
                ]:
                    made[kind] = await self.chart(s, chart_type=kind, **arguments)
                return made

        made = self.drive(go())
        for kind, (image, facts) in made.items():
            self.assertEqual(image.mime_type, "image/png", kind)
            self.assertEqual(png_size(base64.b64decode(image.data)), (800, 480), kind)
            self.assertEqual(facts["chart_type"], kind)
            self.assertEqual(facts["format"], "png")
            self.assertTrue(facts["inline"])
        # NULL amounts are left out, and counted.
        self.assertEqual(made["line"][1]["rows_skipped"], self.facts["nulls"])
        self.assertEqual(made["line"][1]["rows_plotted"], 1000 - self.facts["nulls"])
        self.assertEqual(made["line"][1]["x_axis"], "time")
        self.assertEqual(made["histogram"][1]["rows_plotted"], 1000 - self.facts["nulls"])
        self.assertEqual(made["bar"][1]["series"], 2)
        self.assertEqual(made["bar"][1]["x_axis"], "category")
        self.assertEqual(made["scatter"][1]["x_axis"], "number")

    def test_svg_comes_inline_as_svg_and_a_file_as_asked(self) -> None:
        out = self.tmp / "charts" / "by-day.svg"

        async def go() -> tuple[Any, Any, Any]:
            async with self.server() as s:
                await self.loaded(s)
                inline = await self.chart(s, sql="SELECT day, count(*) AS n FROM events "
                                                 "GROUP BY day", chart_type="line", x="day",
                                          y="n", format="svg", width=400, height=300)
                written = await self.chart(s, sql="SELECT id, amount FROM events",
                                           chart_type="scatter", x="id", y="amount",
                                           output_path=str(out), inline=False)
                with self.assertRaises(ToolCallError) as refused:
                    await self.chart(s, sql="SELECT 1 AS a, 2 AS b", chart_type="bar", x="a",
                                     y="b", output_path=str(out), overwrite=False)
                return inline, written, str(refused.exception)

        (image, facts), (no_image, written), refused = self.drive(go())
        self.assertEqual(image.mime_type, "image/svg+xml")
        root = ET.fromstring(base64.b64decode(image.data))
        self.assertEqual(root.tag, "{http://www.w3.org/2000/svg}svg")
        self.assertEqual(facts["format"], "svg")
        self.assertIsNone(no_image)
        self.assertEqual(written["output_path"], str(out))
        self.assertEqual(written["format"], "svg")  # from the file's name
        self.assertEqual(ET.parse(out).getroot().tag, "{http://www.w3.org/2000/svg}svg")
        self.assertEqual(written["bytes"], out.stat().st_size)
        self.assertIn("output_path:", refused)
        self.assertIn("overwrite", refused)
        self.assertEqual([p.name for p in out.parent.iterdir()], ["by-day.svg"])

    def test_bad_input_gives_clear_tool_errors_and_the_session_goes_on(self) -> None:
        async def go() -> dict[str, str]:
            errors = {}
            async with self.server() as s:
                await self.loaded(s)
                sql = "SELECT day, amount, note FROM events"
                for label, arguments in [
                    ("chart type", {"chart_type": "pie", "x": "day", "y": "amount"}),
                    ("column", {"chart_type": "line", "x": "dya", "y": "amount"}),
                    ("no y", {"chart_type": "bar", "x": "day"}),
                    ("text y", {"chart_type": "scatter", "x": "day", "y": "note"}),
                    ("text histogram", {"chart_type": "histogram", "x": "note"}),
                    ("bins", {"chart_type": "line", "x": "day", "y": "amount", "bins": 5}),
                    ("log histogram", {"chart_type": "histogram", "x": "amount",
                                       "y_scale": "log"}),
                    ("range", {"chart_type": "line", "x": "day", "y": "amount",
                               "y_range": [5, 1]}),
                    ("format", {"chart_type": "line", "x": "day", "y": "amount",
                                "format": "svg", "output_path": str(self.tmp / "c.png")}),
                    ("writes", {"chart_type": "bar", "x": "a", "y": "a",
                                "sql": "DELETE FROM events"}),
                ]:
                    arguments.setdefault("sql", sql)
                    with self.assertRaises(ToolCallError, msg=label) as caught:
                        await self.chart(s, **arguments)
                    errors[label] = str(caught.exception)
                self.assertEqual((await self.call(s, "query", sql="SELECT count(*) FROM "
                                                                  "events"))["rows"], [[1000]])
            return errors

        errors = self.drive(go())
        self.assertIn("chart_type: 'pie'", errors["chart type"])
        self.assertIn("bar, line, scatter, histogram", errors["chart type"])
        self.assertIn("x: the query gives no column 'dya'", errors["column"])
        self.assertIn("'day'", errors["column"])
        self.assertIn("y: a bar chart needs y", errors["no y"])
        self.assertIn("y: column 'note'", errors["text y"])
        self.assertIn("x: a histogram counts numbers", errors["text histogram"])
        self.assertIn("bins:", errors["bins"])
        self.assertIn("y_scale:", errors["log histogram"])
        self.assertIn("y_range:", errors["range"])
        self.assertIn("output_path:", errors["format"])
        self.assertIn("sql:", errors["writes"])
        for label, error in errors.items():
            self.assertNotIn("Traceback", error, label)

    def test_read_only_charts_but_replaces_no_file(self) -> None:
        existing = self.tmp / "old.png"
        existing.write_bytes(b"old")

        async def go() -> tuple[Any, str]:
            async with self.server("--read-only") as s:
                made = await self.chart(s, sql="SELECT * FROM (VALUES (1, 2.5), (2, 3.5)) "
                                               "AS t(a, b)", chart_type="bar", x="a", y="b")
                with self.assertRaises(ToolCallError) as refused:
                    await self.chart(s, sql="SELECT 1 AS a, 2 AS b", chart_type="bar",
                                     x="a", y="b", output_path=str(existing))
                return made, str(refused.exception)

        (image, _), refused = self.drive(go())
        self.assertEqual(png_size(base64.b64decode(image.data)), (800, 480))
        self.assertIn("--read-only", refused)
        self.assertEqual(existing.read_bytes(), b"old")


def test_the_servers_start_does_not_import_matplotlib() -> None:
    program = ("import sys\n"
               "from hyperdaemon.mcp.server import build_server\n"
               "from hyperdaemon.mcp.tools import Tools\n"
               "build_server(Tools(object()))\n"
               "print('matplotlib' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=QUICK * 4)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]


# -- the pure parts --------------------------------------------------------------

def options(**given: Any) -> chart.ChartOptions:
    return chart.chart_options(**{"chart_type": "line", "x": "x", "y": "y", **given})


def test_dates_on_x_are_placed_by_time_unless_told_otherwise() -> None:
    days = [datetime.date(2024, 1, 1), datetime.date(2024, 1, 2), datetime.date(2024, 3, 1)]
    rows = [(day, float(i)) for i, day in enumerate(days)]
    plot = chart.plotted(["x", "y"], rows, options())
    assert plot.x_axis == "time"
    from matplotlib.dates import date2num

    line = chart.figure(plot, options()).axes[0].lines[0]
    at = date2num(line.get_xdata())
    # One day, then 59: the gaps are as long as the time between.
    assert (at[2] - at[1]) / (at[1] - at[0]) == pytest.approx(59)
    evenly = chart.plotted(["x", "y"], rows, options(x_as_category=True))
    assert evenly.x_axis == "category"
    assert list(chart.figure(evenly, options(x_as_category=True)).axes[0].lines[0]
                .get_xdata()) == [0, 1, 2]


def test_timestamps_with_time_zones_are_placed_by_time() -> None:
    utc = datetime.timezone.utc
    at = [datetime.datetime(2024, 1, 1, tzinfo=utc), datetime.datetime(2024, 1, 1, 6, tzinfo=utc)]
    plot = chart.plotted(["x", "y"], [(t, 1.0) for t in at], options(chart_type="scatter"))
    assert plot.x_axis == "time"
    chart.draw(plot, options(chart_type="scatter"))


def test_nulls_are_left_out_and_counted_and_a_line_follows_x() -> None:
    rows = [(3, 1.0), (None, 2.0), (1, None), (2, 5), (1, 4.0)]
    plot = chart.plotted(["x", "y"], rows, options())
    assert plot.series == {None: [(1.0, 4.0), (2.0, 5.0), (3.0, 1.0)]}
    assert (plot.rows_plotted, plot.rows_skipped) == (3, 2)


def test_rows_with_nothing_to_plot_are_an_error_naming_sql() -> None:
    for rows, kind in (([], "line"), ([(None, 1.0), (2, None)], "line"), ([], "histogram"),
                       ([(None, 1.0)], "histogram")):
        with pytest.raises(ToolFailure, match=r"^sql: the query gives \d row\(s\) and none"):
            chart.plotted(["x", "y"], rows, options(chart_type=kind,
                                                    y=None if kind == "histogram" else "y"))


def test_bars_of_the_same_x_and_series_are_added_up() -> None:
    rows = [("a", 1, "s"), ("b", 2, "s"), ("a", 3, "s"), ("a", 4, "t")]
    plot = chart.plotted(["x", "y", "g"], rows, options(chart_type="bar", series="g"))
    assert plot.series == {"s": [("a", 4.0), ("b", 2.0)], "t": [("a", 4.0)]}
    assert plot.categories == ["a", "b"]
    assert any("added up" in note for note in plot.notes)


@pytest.mark.parametrize("given, parameter", [
    ({"chart_type": "pie"}, "chart_type"),
    ({"x": None}, "x"),
    ({"y": None}, "y"),
    ({"chart_type": "histogram", "y": "y"}, "y"),
    ({"bar_orientation": "horizontal"}, "bar_orientation"),
    ({"chart_type": "bar", "bar_orientation": "sideways"}, "bar_orientation"),
    ({"width": 20}, "width"),
    ({"height": True}, "height"),
    ({"x_range": [1]}, "x_range"),
    ({"y_range": [0, float("inf")]}, "y_range"),
    ({"y_scale": "cubic"}, "y_scale"),
    ({"format": "jpeg"}, "format"),
    ({"output_path": "/tmp/chart.jpg"}, "output_path"),
    ({"color_map": {"a": "#e41a1c"}}, "color_map"),
    ({"series": "g", "color_map": {"a": "not a colour"}}, "color_map"),
    ({"label_points": True}, "label_points"),
    ({"label_values": True}, "label_values"),
])
def test_a_bad_option_is_refused_naming_its_parameter(given: dict[str, Any],
                                                       parameter: str) -> None:
    with pytest.raises(ToolFailure) as caught:
        options(**given)
    assert str(caught.value).startswith(f"{parameter}:")


def test_the_format_follows_the_output_path() -> None:
    assert options(output_path="/tmp/a.SVG").format == "svg"
    assert options().format == "png"
    assert options(format="SVG").format == "svg"


def test_the_same_chart_gives_the_same_svg() -> None:
    plot = chart.plotted(["x", "y"], [(1, 2.0), (2, 3.0)], options(format="svg"))
    assert chart.draw(plot, options(format="svg")) == chart.draw(plot, options(format="svg"))
