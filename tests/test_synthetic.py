"""The synthetic task family of issue 17: seeded scenes, pixels that agree with the answers, the question templates,
and mp4 files the engine's decoder reads at the stated size and rate."""
import dataclasses
import json
import re

import numpy as np
import pytest

from dynfocus_infer.cli import main
from dynfocus_infer.synthetic import (COLOURS, SHAPES, STILL, encode_mp4, questions_for, render_frames, sample_clip,
                                      sample_scene, write_dataset)
from dynfocus_infer.synthetic.scene import DIRECTIONS
from dynfocus_infer.video_decode import decode_video, uniform_frame_indices

SCENES = [sample_scene(7, i) for i in range(300)]
TEMPLATES = {
    "colour": (r"What colour is the (circle|square|triangle)\?", r"(red|green|blue|yellow|white|purple)"),
    "shape": (r"What shape is the (red|green|blue|yellow|white|purple) object\?", r"(circle|square|triangle)"),
    "direction": (r"Which way does the (red|green|blue|yellow|white|purple) (circle|square|triangle) move\?",
                  r"(left|right|up|down|it does not move)"),
    "count": (r"How many shapes are there\?", r"(one|two|three)"),
    "brief": (r"What colour was the shape that appeared only briefly\?", r"(red|green|blue|yellow|white|purple)"),
    "describe": (r"Describe the video\.",
                 r"A (red|green|blue|yellow|white|purple) (circle|square|triangle) (moves (left|right|up|down)|does not "
                 r"move)\.( A (red|green|blue|yellow|white|purple) (circle|square|triangle) (moves (left|right|up|down)"
                 r"|does not move)\.){0,2}"),
}


def small(scene, width=192, height=144, fps=10, num_frames=30):
    """The same scene drawn smaller and shorter (shapes rescaled to the new square), for fast encode tests."""
    scale = min(width, height) / min(scene.width, scene.height)
    old_left, old_top, _ = scene.square
    left, top = (width - min(width, height)) / 2, (height - min(width, height)) / 2
    shapes = []
    for shape in scene.shapes:
        time_scale = (scene.num_frames - 1) / (num_frames - 1)
        first = int(shape.first * num_frames / scene.num_frames)
        last = max(first + 1, int(round(shape.last * num_frames / scene.num_frames)))
        shapes.append(dataclasses.replace(
            shape, radius=shape.radius * scale, first=first, last=last,
            start=(left + (shape.start[0] - old_left) * scale, top + (shape.start[1] - old_top) * scale),
            velocity=(shape.velocity[0] * scale * time_scale, shape.velocity[1] * scale * time_scale)))
    return dataclasses.replace(scene, width=width, height=height, fps=fps, num_frames=num_frames, shapes=tuple(shapes))


def test_a_seed_and_index_give_the_same_scene_and_pixels_every_time():
    again = [sample_scene(7, i) for i in range(20)]
    assert again == SCENES[:20]
    np.testing.assert_array_equal(sample_clip(7, 3, 12).frames, sample_clip(7, 3, 12).frames)
    others = [sample_scene(8, i) for i in range(20)]
    assert sum(a == b for a, b in zip(others, SCENES)) == 0


def test_scenes_cover_the_issues_ranges():
    for scene in SCENES:
        assert 160 <= scene.width <= 640 and 120 <= scene.height <= 480
        assert scene.width % 2 == 0 and scene.height % 2 == 0
        assert 8 <= scene.fps <= 30
        assert 2.0 - 1 / scene.fps <= scene.num_frames / scene.fps <= 15.0 + 1 / scene.fps
        assert 1 <= len(scene.shapes) <= 3
        assert len({(s.kind, s.colour) for s in scene.shapes}) == len(scene.shapes)
        for shape in scene.shapes:
            assert shape.kind in SHAPES and shape.colour in COLOURS
            assert shape.direction in DIRECTIONS or shape.direction == STILL
    directions = {s.direction for scene in SCENES for s in scene.shapes}
    assert directions == set(DIRECTIONS) | {STILL}
    assert {len(s.shapes) for s in SCENES} == {1, 2, 3}
    assert 0.15 < np.mean([s.brief_index is not None for s in SCENES]) < 0.35
    assert {s.width for s in SCENES} != {SCENES[0].width}


def test_brief_shapes_are_visible_in_10_to_25_percent_of_the_frames_and_others_throughout():
    for scene in SCENES:
        for i, shape in enumerate(scene.shapes):
            shown = sum(scene.visible(i, f) for f in range(scene.num_frames)) / scene.num_frames
            if i == scene.brief_index:
                assert 0.10 <= shown <= 0.25, (scene.index, shown)
                assert shape.direction == STILL
            else:
                assert shown == 1.0


def test_shapes_stay_in_the_centre_square_and_never_overlap():
    for scene in SCENES:
        left, top, side = scene.square
        for shape in scene.shapes:
            for frame in (shape.first, shape.last - 1):
                x, y = shape.centre(frame)
                assert left + shape.radius <= x <= left + side - shape.radius
                assert top + shape.radius <= y <= top + side - shape.radius
        frames = render_frames(scene, [0, scene.num_frames // 2, scene.num_frames - 1])
        for row, frame in enumerate((0, scene.num_frames // 2, scene.num_frames - 1)):
            painted = (frames[row] != np.array(scene.background, np.uint8)).any(-1).sum()
            area = sum({"circle": np.pi, "square": 4.0, "triangle": 2.0}[s.kind] * s.radius ** 2
                       for i, s in enumerate(scene.shapes) if scene.visible(i, frame))
            assert abs(painted - area) <= 0.1 * area + 8 * sum(s.radius for s in scene.shapes), scene.index


def test_every_template_and_answer_has_the_issues_wording():
    seen = set()
    for scene in SCENES:
        items = questions_for(scene)
        for item in items:
            question, answer = TEMPLATES[item["type"]]
            assert re.fullmatch(question, item["question"]), item
            assert re.fullmatch(answer, item["answer"]), item
            seen.add(item["type"])
        kinds = [s.kind for s in scene.shapes]
        colour_questions = [i for i in items if i["type"] == "colour"]
        assert len(colour_questions) == sum(kinds.count(k) == 1 for k in set(kinds))
        assert [i["answer"] for i in items if i["type"] == "count"] == [["one", "two", "three"][len(kinds) - 1]]
        describe = [i["answer"] for i in items if i["type"] == "describe"][0]
        assert describe.count(".") == len(scene.shapes)
        for shape in scene.shapes:
            assert f"A {shape.colour} {shape.kind} " in describe
        brief = [i["answer"] for i in items if i["type"] == "brief"]
        assert brief == ([] if scene.brief_index is None else [scene.shapes[scene.brief_index].colour])
    assert seen == set(TEMPLATES)


def test_hand_made_scene_answers():
    scene = SCENES[0]
    red = dataclasses.replace(scene.shapes[0], kind="circle", colour="red", direction="left")
    blue = dataclasses.replace(scene.shapes[0], kind="square", colour="blue", direction=STILL)
    items = {(i["type"], i["question"]): i["answer"] for i in
             questions_for(dataclasses.replace(scene, shapes=(red, blue), brief_index=1))}
    assert items[("describe", "Describe the video.")] == "A red circle moves left. A blue square does not move."
    assert items[("colour", "What colour is the circle?")] == "red"
    assert items[("shape", "What shape is the blue object?")] == "square"
    assert items[("direction", "Which way does the blue square move?")] == "it does not move"
    assert items[("count", "How many shapes are there?")] == "two"
    assert items[("brief", "What colour was the shape that appeared only briefly?")] == "blue"


def _colour_mask(frames, rgb, tolerance=60):
    return np.abs(frames.astype(np.int32) - np.array(rgb)).max(-1) <= tolerance


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Three scenes (one moving shape each way at least, one brief shape) encoded small, and decoded by the engine."""
    picks = [next(s for s in SCENES if s.brief_index is not None and len(s.shapes) == 2)]
    picks += [next(s for s in SCENES if any(x.direction in ("left", "right") for x in s.shapes))]
    picks += [next(s for s in SCENES if any(x.direction in ("up", "down") for x in s.shapes))]
    out = []
    for n, scene in enumerate(picks):
        scene = small(scene, num_frames=40)
        path = tmp_path_factory.mktemp("mp4") / f"{n}.mp4"
        encode_mp4(scene, path)
        out.append((scene, decode_video(str(path), num_frames=scene.num_frames)))
    return out


def test_mp4_is_read_by_the_engines_decoder_at_the_stated_size_and_rate(encoded):
    for scene, video in encoded:
        assert video.num_source_frames == scene.num_frames
        assert tuple(video.frames.shape) == (scene.num_frames, scene.height, scene.width, 3)
        assert video.source_fps == pytest.approx(scene.fps, rel=1e-3)


def test_decoded_colour_at_each_shape_centre_is_its_colour(encoded):
    for scene, video in encoded:
        frames = video.frames.numpy()
        for i, shape in enumerate(scene.shapes):
            for frame in range(shape.first, shape.last):
                x, y = shape.centre(frame)
                pixel = frames[frame, int(y), int(x)].astype(int)
                assert np.abs(pixel - COLOURS[shape.colour]).max() <= 30, (scene.index, shape, frame, pixel)
            hidden = [f for f in range(scene.num_frames) if not scene.visible(i, f)]
            for frame in hidden:
                x, y = shape.centre(frame)
                assert np.abs(frames[frame, int(y), int(x)].astype(int) - scene.background).max() <= 30


def _centroid_near(frame_pixels, rgb, centre, radius):
    """Centroid (x, y) of the pixels of colour `rgb` within 1.3 radius of `centre` (None when none are there)."""
    x0, y0 = (max(0, int(c - 1.3 * radius)) for c in centre)
    window = frame_pixels[y0:int(centre[1] + 1.3 * radius) + 1, x0:int(centre[0] + 1.3 * radius) + 1]
    ys, xs = np.nonzero(_colour_mask(window, rgb))
    return None if len(xs) < 0.5 * radius ** 2 else (x0 + xs.mean() + 0.5, y0 + ys.mean() + 0.5)


def test_decoded_motion_matches_the_stated_direction_and_brief_visibility(encoded):
    checked = set()
    for scene, video in encoded:
        frames = video.frames.numpy()
        for i, shape in enumerate(scene.shapes):
            found = [_centroid_near(frames[f], COLOURS[shape.colour], shape.centre(f), shape.radius)
                     for f in range(scene.num_frames)]
            present = np.array([c is not None for c in found])
            if i == scene.brief_index:
                assert 0.10 <= present.mean() <= 0.25 + 1 / scene.num_frames, present.mean()
                checked.add("brief")
                continue
            assert present.all()
            (xs, ys), (xe, ye) = found[0], found[-1]
            dx, dy = xe - xs, ye - ys
            side = min(scene.width, scene.height)
            if shape.direction == STILL:
                assert max(abs(dx), abs(dy)) < 2, (dx, dy)
                continue
            expected = DIRECTIONS[shape.direction]
            along, across = (dx, dy) if expected[0] else (dy, dx)
            assert np.sign(along) == expected[0] + expected[1] and abs(along) > 0.25 * side, (shape, dx, dy)
            assert abs(across) < 2, (shape, dx, dy)
            checked.add(shape.direction)
    assert "brief" in checked and len(checked) >= 3


def test_in_memory_clip_holds_the_frames_the_engine_samples():
    clip = sample_clip(7, 5, 12)
    np.testing.assert_array_equal(clip.frame_indices, uniform_frame_indices(clip.scene.num_frames, 12))
    np.testing.assert_array_equal(clip.frames, render_frames(clip.scene, clip.frame_indices))
    # a brief shape is in at least one of 12 uniformly sampled frames (spacing < 10% of the video)
    for scene in SCENES:
        if scene.brief_index is not None:
            indices = uniform_frame_indices(scene.num_frames, 12)
            assert any(scene.visible(scene.brief_index, int(f)) for f in indices), scene.index


def test_generate_command_writes_a_dataset_and_rejects_bad_options(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "d"), "--count", "2", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "qa.jsonl").read_text().splitlines()]
    scenes = [json.loads(line) for line in (tmp_path / "d" / "scenes.jsonl").read_text().splitlines()]
    assert {r["video"] for r in rows} == {"videos/000000.mp4", "videos/000001.mp4"}
    assert [r["question"] for r in rows] == [q["question"] for i in range(2) for q in questions_for(sample_scene(3, i))]
    assert len({r["id"] for r in rows}) == len(rows)
    assert [s["num_frames"] for s in scenes] == [sample_scene(3, i).num_frames for i in range(2)]
    video = decode_video(str(tmp_path / "d" / rows[0]["video"]), num_frames=4)
    assert video.frames.shape[1:3] == (scenes[0]["height"], scenes[0]["width"])
    assert main(["generate", "--out", str(tmp_path / "d"), "--count", "2"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["generate", "--out", str(tmp_path / "e"), "--count", "0"]) == 2
    assert main(["generate", "--out", str(tmp_path / "e"), "--count", "1", "--seed", "-1"]) == 2
    assert not (tmp_path / "e").exists()
    with pytest.raises(Exception):
        write_dataset(tmp_path / "f", 0, 0)
