"""The class mapping a checkpoint stores and a dataset's class table: stored settings read back
exactly, tables in CSV parsed column by column, colour masks decoded pixel by pixel, and the
one-line errors that name what is wrong."""

import json

import numpy as np
import pytest

from segcli.data.classes import (
    ClassMapping,
    default_palette,
    parse_ignore_values,
    read_class_table,
)
from segcli.errors import UsageError


def test_a_stored_mapping_reads_back_with_every_setting():
    # Catches from_dict dropping or defaulting a field a checkpoint holds (palette, raw values,
    # ignore colours, the foreground value, ignore rules): eval and predict would then read
    # masks differently from training.
    mapping = ClassMapping(
        kind="index",
        names=["road", "car"],
        palette=[(1, 2, 3), (4, 5, 6)],
        values=[7, 9],
        ignore_index=250,
        ignore_colors=[(9, 9, 9)],
        foreground_value=9,
        ignore_values=[11, 12],
        ignore_unlisted=True,
        reduce_zero_label=True,
    )
    again = ClassMapping.from_dict(mapping.to_dict())
    assert again.to_dict() == mapping.to_dict()
    assert (again.kind, again.names, again.values) == ("index", ["road", "car"], [7, 9])
    assert again.palette == [(1, 2, 3), (4, 5, 6)] and again.ignore_colors == [(9, 9, 9)]
    assert (again.ignore_index, again.foreground_value) == (250, 9)
    assert again.ignore_values == [11, 12]
    assert again.ignore_unlisted is True and again.reduce_zero_label is True


def test_a_mapping_stored_before_the_ignore_settings_existed_reads_with_their_defaults():
    # Catches defaults that differ from a fresh mapping's: a checkpoint of an earlier version
    # (only kind and names stored) must decode masks as it did when it was trained.
    old = ClassMapping.from_dict({"kind": "index", "names": ["a", "b", "c"]})
    fresh = ClassMapping(kind="index", names=["a", "b", "c"])
    assert old.to_dict() == fresh.to_dict()
    assert old.ignore_index == 255 and old.values is None and old.ignore_values == []
    assert old.ignore_unlisted is False and old.reduce_zero_label is False
    raw = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(old.encode(raw), [[0, 1], [2, 255]])


def test_an_unknown_value_names_the_file_the_value_and_what_the_mapping_knows():
    # Catches an error that names neither the mask nor the offending value, or lists the
    # wrong known values (the user is told what to fix).
    indexed = ClassMapping(kind="index", names=["a", "b", "c"])
    with pytest.raises(UsageError) as raised:
        indexed.encode(np.array([[0, 7]], dtype=np.uint8), "m/x.png")
    message = str(raised.value)
    assert message.startswith("m/x.png: value 7 maps to no class")
    assert "index masks, classes 0..2, 255 = ignore" in message
    valued = ClassMapping(kind="index", names=["a", "b"], values=[10, 20])
    with pytest.raises(UsageError, match=r"values 10, 20, 255 = ignore"):
        valued.encode(np.array([[10, 30]], dtype=np.uint8), "y.png")
    binary = ClassMapping(kind="binary", names=["background", "foreground"])
    with pytest.raises(UsageError) as raised:
        binary.encode(np.array([[0, 3]], dtype=np.uint8), "b.png")
    assert "= ignore" not in str(raised.value) and "value 3" in str(raised.value)


def test_colour_masks_decode_pixel_by_pixel_and_name_an_unknown_colour():
    # Catches a colour key built from the wrong channels or shifts (two colours colliding),
    # ignore colours not mapped to the ignore index, and an error without the colour.
    mapping = ClassMapping(
        kind="rgb",
        names=["a", "b", "c"],
        palette=[(0, 0, 0), (255, 0, 0), (0, 0, 255)],
        ignore_colors=[(255, 255, 255)],
    )
    mask = np.array([[[0, 0, 0], [255, 0, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(mapping.encode(mask), [[0, 1], [2, 255]])
    with_alpha = np.concatenate([mask, np.full((2, 2, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(mapping.encode(with_alpha), [[0, 1], [2, 255]])
    with pytest.raises(UsageError, match=r"c\.png: colour \(0, 255, 0\) maps to no class"):
        mapping.encode(np.array([[[0, 255, 0]]], dtype=np.uint8), "c.png")
    with pytest.raises(UsageError, match="single-channel"):
        mapping.encode(np.zeros((2, 2), np.uint8), "g.png")


def test_csv_tables_read_values_names_colours_and_ignore_rows(tmp_path):
    # Catches a CSV reader that loses the value column (classes renumbered), reads colours
    # from the wrong columns, keeps an ignore row as a class, or calls 0..K-1 values custom.
    table = tmp_path / "classes.csv"
    table.write_text(
        "Value,Name,R,G,B,ignore\n0,sky,10,20,30,\n5, road ,40,50,60,no\n9,void,0,0,0,yes\n"
        "7,car,70,80,90,\n"
    )
    read = read_class_table(table)
    assert read.names == ["sky", "road", "car"]
    assert read.values == [0, 5, 7]
    assert read.colors == [(10, 20, 30), (40, 50, 60), (70, 80, 90)]
    assert read.ignore_values == [9]
    hex_colours = tmp_path / "hex.csv"
    hex_colours.write_text("name,color\nsky,#0a141e\nroad,28323C\n")
    read = read_class_table(hex_colours)
    assert read.values is None  # 0..K-1 in order: plain class indices
    assert read.colors == [(10, 20, 30), (40, 50, 60)]
    names_only = tmp_path / "names.csv"
    names_only.write_text("value\n3\n1\n")
    assert read_class_table(names_only).names == ["3", "1"]
    assert read_class_table(names_only).values == [3, 1]


def test_text_tables_skip_blank_lines_and_labelmes_ignore_entry(tmp_path):
    # Catches labelme's "__ignore__" counted as class 0 (every class shifted by one).
    table = tmp_path / "labels.txt"
    table.write_text("__ignore__\n\n_background_\n  cat \ndog\n")
    assert read_class_table(table).names == ["_background_", "cat", "dog"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n__ignore__\n")
    with pytest.raises(UsageError, match="no class names"):
        read_class_table(empty)


def test_the_default_palette_is_the_pascal_voc_colour_map():
    # The published VOC colours (devkit's labelcolormap): catches a bit shifted into the wrong
    # channel or order, which would draw VOC masks in other colours than their own PNGs.
    voc = default_palette(256)
    assert voc[:9] == [
        (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128),
        (128, 0, 128), (0, 128, 128), (128, 128, 128), (64, 0, 0),
    ]  # fmt: skip
    assert voc[15] == (192, 128, 128) and voc[20] == (0, 64, 128)  # person, tvmonitor
    assert voc[255] == (224, 224, 192)  # the border colour of VOC's masks
    assert len(set(voc)) == 256


def test_json_tables_read_values_colours_and_ignore_entries(tmp_path):
    # Catches ignore entries kept as classes, a single ignore colour read as three numbers,
    # a scalar ignore_values refused, values defaulted wrongly, and 0..K-1 called custom.
    table = tmp_path / "classes.json"
    table.write_text(
        json.dumps(
            {
                "classes": [
                    {"name": "sky", "value": 3, "color": "#0a141e"},
                    {"name": "void", "value": 9, "color": [1, 1, 1], "ignore": True},
                    {"name": "road", "value": 5, "color": [40, 50, 60]},
                ],
                "ignore_color": [255, 255, 255],
                "ignore_values": 11,
            }
        )
    )
    read = read_class_table(table)
    assert read.names == ["sky", "road"] and read.values == [3, 5]
    assert read.colors == [(10, 20, 30), (40, 50, 60)]
    assert read.ignore_colors == [(255, 255, 255), (1, 1, 1)]
    assert read.ignore_values == [11, 9]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(["a", {"name": "b"}, {"name": "c", "value": 2}]))
    read = read_class_table(plain)
    assert read.names == ["a", "b", "c"] and read.values is None and read.colors is None
    several = tmp_path / "several.json"
    several.write_text(json.dumps({"classes": ["a"], "ignore_colors": [[1, 2, 3], "#040506"]}))
    assert read_class_table(several).ignore_colors == [(1, 2, 3), (4, 5, 6)]


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("classes.csv", "", "no classes"),
        ("classes.csv", "id,label\n1,a\n", "'name' or 'value' column"),
        ("classes.csv", "value,name,ignore\n1,a,yes\n", "every row is an ignore row"),
        ("classes.csv", "value,name\nx,a\n", "bad value 'x'"),
        ("classes.csv", "name,color\na,#12345\n", "bad colour"),
        ("classes.csv", "name,r,g,b\na,1,2,300\n", "bad colour"),
        ("classes.json", "{", "not a readable JSON class table"),
        ("classes.json", '{"classes": []}', "expected a list of classes"),
        ("classes.json", '{"names": ["a"]}', "expected a list of classes"),
        ("classes.json", '[{"value": 1}]', "class 0 needs a 'name'"),
        ("classes.json", '["a", 3]', "class 1 needs a 'name'"),
        ("classes.json", '[{"name": "void", "ignore": true}, "a"]', "'void' needs a 'value'"),
        ("classes.json", '[{"name": "a", "color": [0, 0, 0]}, "b"]', "for every class or for none"),
        (
            "classes.json",
            '[{"name": "void", "value": 1, "ignore": true}]',
            "every entry is an ignore",
        ),
        ("classes.json", '[{"name": "a", "value": "x"}]', "bad value 'x'"),
        ("classes.json", '{"classes": ["a"], "ignore_values": ["z"]}', "bad ignore value 'z'"),
        ("classes.json", '[{"name": "void", "value": "x", "ignore": true}, "a"]', "bad value 'x'"),
        ("classes.json", '[{"name": "void", "color": "#zz", "ignore": true}, "a"]', "bad colour"),
        ("classes.json", '{"classes": ["a"], "ignore_color": [0, 0, 256]}', "bad colour"),
        ("classes.json", '[{"name": "a", "color": 5}]', "bad colour 5;"),
        ("classes.json", '[{"name": "a", "color": ["r", "g", "b"]}]', "bad colour"),
        ("classes.json", '[{"name": "a", "color": [0, 256, 0]}]', "bad colour"),
        ("classes.json", '[{"name": "a", "color": [0, 0]}]', "bad colour"),
        ("classes.json", '[{"name": "a", "value": 1}, {"name": "b", "value": 1}]', "share a value"),
        ("classes.csv", b"value,name\n1,caf\xe9\n", "not a readable CSV class table"),
        ("classes.txt", b"caf\xe9\n", "not a readable class list"),
    ],
)
def test_bad_class_tables_are_one_line_naming_the_file(tmp_path, name, text, fragment):
    # Catches a malformed table read as something else (a class named 'x', a colour wrapped
    # past 255, an ignore entry kept as a class) instead of refused with the file and the fix.
    table = tmp_path / name
    table.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UsageError) as raised:
        read_class_table(table)
    message = str(raised.value)
    assert message.startswith(str(table)) and fragment in message and "\n" not in message


def test_a_missing_class_table_names_the_file_and_the_setting(tmp_path):
    with pytest.raises(UsageError) as raised:
        read_class_table(tmp_path / "nope.json")
    assert (
        str(raised.value)
        == f"{tmp_path / 'nope.json'}: class table not found; check `classes_file`"
    )


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("11", [11]),
        (" 0, 11 ", [0, 11]),
        ("", []),
        (None, []),
        ([5, 3], [5, 3]),
        ("7,", [7]),
        ("0,65535", [0, 65535]),
    ],
)
def test_ignore_values_parse_as_raw_mask_values(text, values):
    assert parse_ignore_values(text) == values


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("x1", "give raw mask values"),
        ("70000", "0..65535"),
        ("65536", "0..65535"),
        ("-1", "0..65535"),
    ],
)
def test_bad_ignore_values_name_the_setting(text, fragment):
    with pytest.raises(UsageError) as raised:
        parse_ignore_values(text)
    assert str(raised.value).startswith(f"`ignore_values` {text}:") and fragment in str(
        raised.value
    )


def test_a_mapping_checks_itself_and_completes_its_palette():
    # Catches an unknown kind or no classes accepted, a short palette left short (colour
    # masks of the last classes undrawable), ignore values unsorted or repeated, and a value
    # that is both a class and ignored accepted silently.
    with pytest.raises(UsageError, match="unknown mask kind 'jpeg'"):
        ClassMapping(kind="jpeg", names=["a"])
    with pytest.raises(UsageError, match="at least one class"):
        ClassMapping(kind="index", names=[])
    mapping = ClassMapping(
        kind="index", names=["a", "b", "c"], palette=[[9, 9, 9]], ignore_values=[12, 11, 12]
    )
    assert mapping.palette == [(9, 9, 9), *default_palette(3)[1:]]
    assert mapping.ignore_values == [11, 12]
    trimmed = ClassMapping(kind="index", names=["a"], palette=[(1, 2, 3), (4, 5, 6)])
    assert trimmed.palette == [(1, 2, 3)]
    with pytest.raises(UsageError, match=r"value 5 is both class 'road' and ignored"):
        ClassMapping(kind="index", names=["sky", "road"], values=[4, 5], ignore_values=[5, 6])
    assert ClassMapping(kind="rgb", names=["a"], ignore_values=[0]).ignore_values == [0]


def test_describe_names_the_kind_classes_and_every_ignore_rule():
    mapping = ClassMapping(
        kind="palette",
        names=["a", "b"],
        ignore_values=[11],
        ignore_unlisted=True,
        reduce_zero_label=True,
    )
    assert mapping.describe() == (
        "palette masks, 2 classes: a, b; also ignored: 11, any value of no class; "
        "raw k is class k-1 (reduce-zero-label)"
    )
    assert ClassMapping(kind="index", names=["a"]).describe() == "index masks, 1 classes: a"


def test_value_masks_decode_through_ignore_rules_and_refuse_what_no_rule_covers():
    # Catches the lookup table built for the wrong dtype range (16-bit values), ignore values
    # or unlisted values not mapped to the ignore index, a gray mask saved as RGB refused,
    # boolean masks read as 0/1 instead of 0/255, and float masks accepted.
    mapping = ClassMapping(kind="index", names=["a", "b"], values=[0, 1000], ignore_values=[7])
    mask16 = np.array([[0, 1000], [7, 255]], dtype=np.uint16)
    np.testing.assert_array_equal(mapping.encode(mask16), [[0, 1], [255, 255]])
    with pytest.raises(UsageError, match="value 3 maps to no class"):
        mapping.encode(np.array([[0, 3]], dtype=np.uint16))
    unlisted = ClassMapping(kind="index", names=["a", "b"], ignore_unlisted=True)
    np.testing.assert_array_equal(unlisted.encode(np.array([[1, 9]], np.uint8)), [[1, 255]])
    gray_rgb = np.stack([np.array([[0, 1]], np.uint8)] * 3, axis=2)
    np.testing.assert_array_equal(unlisted.encode(gray_rgb), [[0, 1]])
    with pytest.raises(UsageError, match="is a colour mask but the dataset's masks are index"):
        unlisted.encode(np.array([[[0, 1, 0]]], np.uint8), "c.png")
    binary = ClassMapping(kind="binary", names=["background", "foreground"], values=[0, 255])
    np.testing.assert_array_equal(binary.encode(np.array([[False, True]])), [[0, 1]])
    with pytest.raises(UsageError, match="float32 values; masks must hold integers"):
        binary.encode(np.zeros((1, 2), np.float32))
    with pytest.raises(UsageError, match="value -1 maps to no class"):
        mapping.encode(np.array([[-1, 0]], dtype=np.int32))
    with pytest.raises(UsageError, match="value 70000 maps to no class"):
        mapping.encode(np.array([[70000]], dtype=np.int32))


def test_colour_tables_decode_every_channel_and_accept_rgba_entries(tmp_path):
    # Catches a colour key that drops or shifts the green channel (VOC's class 2 is pure
    # green), an ignore entry given only by colour refused, a bare-list table losing its
    # ignore colours, and an [r, g, b, a] entry refused instead of read as its colour.
    table = tmp_path / "classes.json"
    table.write_text(
        json.dumps(
            [
                {"name": "void", "color": [9, 9, 9], "ignore": True},
                {"name": "a", "color": [0, 0, 0]},
                {"name": "b", "color": [0, 128, 0, 255]},
                {"name": "c", "color": [0, 1, 0]},
                {"name": "d", "color": "#010000"},
            ]
        )
    )
    read = read_class_table(table)
    assert read.colors == [(0, 0, 0), (0, 128, 0), (0, 1, 0), (1, 0, 0)]
    assert read.ignore_colors == [(9, 9, 9)]
    mapping = ClassMapping(
        kind="rgb", names=read.names, palette=read.colors, ignore_colors=read.ignore_colors
    )
    mask = np.array([[[0, 128, 0], [0, 1, 0], [1, 0, 0], [9, 9, 9], [0, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(mapping.encode(mask), [[1, 2, 3, 255, 0]])


def test_value_masks_at_the_limits_of_their_dtype():
    # Catches off-by-one bounds in the value checks and lookup tables: 65535 is a valid
    # 16-bit value, 65536 in an int32 mask must be one error naming the file and that value
    # (not an IndexError, not the mask's minimum), and class or ignore values past 255 must
    # not break the lookup of 8-bit masks.
    top = ClassMapping(kind="index", names=["a", "b"], values=[0, 65535])
    np.testing.assert_array_equal(top.encode(np.array([[65535, 0]], np.uint16)), [[1, 0]])
    for bad in (65536, 70000):
        with pytest.raises(UsageError) as raised:
            top.encode(np.array([[0, bad]], np.int32), "m/big.png")
        assert str(raised.value).startswith(f"m/big.png: value {bad} maps to no class")
    with pytest.raises(UsageError, match="value -3 maps"):
        top.encode(np.array([[5, -3]], np.int32))
    wide = ClassMapping(kind="index", names=["a", "b"], values=[0, 256], ignore_values=[1, 256 + 1])
    np.testing.assert_array_equal(wide.encode(np.array([[0, 1]], np.uint8)), [[0, 255]])
    ignored_256 = ClassMapping(kind="index", names=["a", "b"], ignore_values=[256])
    np.testing.assert_array_equal(ignored_256.encode(np.array([[1, 0]], np.uint8)), [[1, 0]])
    ignore_index_256 = ClassMapping(kind="index", names=["a", "b"], ignore_index=256)
    np.testing.assert_array_equal(ignore_index_256.encode(np.array([[1, 0]], np.uint8)), [[1, 0]])


def test_raw_zero_can_be_ignored_and_binary_masks_have_no_ignore_value():
    # Catches ignore values of 0 skipped (ADE20K-style "other" read as an error) and the
    # index masks' 255 = ignore rule applied to 0/1 binary masks, where 255 is a corrupt
    # pixel to report, not a pixel to drop silently.
    shifted = ClassMapping(kind="index", names=["a", "b"], values=[1, 2], ignore_values=[0])
    np.testing.assert_array_equal(shifted.encode(np.array([[0, 1, 2]], np.uint8)), [[255, 0, 1]])
    binary = ClassMapping(kind="binary", names=["background", "foreground"], values=[0, 1])
    np.testing.assert_array_equal(binary.encode(np.array([[0, 1]], np.uint8)), [[0, 1]])
    with pytest.raises(UsageError, match="value 255 maps to no class"):
        binary.encode(np.array([[0, 255]], np.uint8))
