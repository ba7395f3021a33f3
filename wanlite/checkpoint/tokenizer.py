"""A working umT5-style tokenizer folder, built locally and deterministically.

The real `google/umt5-xxl/` tokenizer (256k SentencePiece pieces) cannot be
fetched here and is far too big for a test fixture, so the synthetic teacher
ships a small one with the same shape: a SentencePiece unigram model with T5's
special ids (pad 0, eos 1, unk 2, no bos), saved as spiece.model + tokenizer.json
+ tokenizer_config.json + special_tokens_map.json so that
`transformers.AutoTokenizer.from_pretrained(folder)` loads it as a T5 tokenizer.

Training runs single-threaded with a fixed seed on the embedded corpus below, and
every file is byte-identical across runs: the teacher's content hash (its store
key) must not change when nothing changed. `VOCAB_SIZE` is the tiny T5's
embedding size. The `a14b` synthetic teacher uses this same small tokenizer with
UMT5-XXL's real 256384-row embedding: ids past `VOCAB_SIZE` are simply never
produced, exactly as the real umT5 pads its embedding past its tokenizer.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import sentencepiece as spm
from transformers import T5Tokenizer

SPM_PIECES = 500
"""SentencePiece pieces, special tokens included (pad, eos, unk)."""
EXTRA_IDS = 12
"""T5 sentinel tokens `<extra_id_N>` appended after the pieces (umT5 has 300)."""
VOCAB_SIZE = SPM_PIECES + EXTRA_IDS
"""Token ids the tokenizer can produce; the tiny T5's embedding has exactly this many rows."""
SEED = 0

TOKENIZER_FILES = ("spiece.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")

# Prompt-like English with digits and punctuation: enough distinct substrings for a
# 500-piece unigram model, and close to what the text encoder sees in the tests.
CORPUS = """\
A photograph of a red fox sitting in fresh snow at dawn.
An oil painting of a lighthouse on a rocky coast during a storm.
A close-up portrait of an elderly fisherman with a weathered face.
A bowl of ramen with a soft-boiled egg, scallions and sliced pork.
A futuristic city skyline at night, neon signs reflected in the rain.
A watercolor illustration of a hummingbird drinking from a flower.
Two children flying a kite on a windy hill under a cloudy sky.
A vintage bicycle leaning against a brick wall covered in ivy.
A macro photo of a dew drop on a spider web in the morning light.
An astronaut riding a horse across the surface of the moon.
A cozy library with tall wooden shelves and a crackling fireplace.
A steaming cup of coffee beside an open notebook and a pen.
A herd of elephants crossing a dusty river in the savanna.
A minimalist poster of a mountain range in pastel colors.
A medieval castle on a cliff overlooking a misty valley.
A golden retriever puppy chasing bubbles in a sunny backyard.
A street market in Marrakech with piles of colorful spices.
A sailboat drifting on calm turquoise water near a tropical island.
A pencil sketch of a cat curled up asleep on a windowsill.
A snowy forest path lit by lanterns on a quiet winter evening.
An abstract composition of overlapping circles and triangles.
A chef tossing vegetables in a flaming wok in a busy kitchen.
A tiny robot watering a potted plant on a kitchen table.
The northern lights swirling above a frozen lake in Norway.
A jazz band playing in a smoky basement club.
A field of sunflowers stretching to the horizon in late summer.
A detailed map of an imaginary archipelago drawn in ink.
A glass of orange juice on a breakfast table by the window.
A koi pond with lily pads and a small wooden bridge.
A sports car speeding along a coastal highway at sunset.
A portrait of a queen wearing a jeweled crown and velvet robe.
A bustling train station in Tokyo during the morning rush hour.
An owl perched on a branch under a full moon.
A stack of pancakes drizzled with maple syrup and blueberries.
A desert canyon with layered red rock formations.
A young woman reading a book in a sunlit garden.
A cyberpunk alley with flickering holographic advertisements.
A ceramic vase with blue floral patterns on a linen cloth.
A waterfall cascading into a clear pool surrounded by ferns.
A hot air balloon floating over green rolling hills.
A black and white photo of a busy street in Paris in 1950.
A dragon sleeping on a hoard of gold coins in a cave.
A loaf of sourdough bread fresh from the oven on a cutting board.
An underwater scene with a sea turtle and a school of fish.
A farmer driving a tractor through a wheat field.
A neon-lit diner on an empty highway at midnight.
A pair of worn leather boots by the front door.
A violinist performing on a stage under a single spotlight.
A tropical rainforest with mist rising between giant trees.
A snowman with a carrot nose and a striped scarf.
A mosaic of colorful tiles forming a peacock.
A quiet harbor with fishing boats at dawn.
A child building a sandcastle on a crowded beach.
A bonsai tree in a shallow dish on a wooden stand.
A thunderstorm over a prairie with a single lightning bolt.
A plate of sushi arranged neatly on a slate board.
An ancient temple overgrown with roots in the jungle.
A skateboarder jumping over a railing in an empty plaza.
A bouquet of tulips in a glass jar on a windowsill.
A wolf howling on a ridge against a starry sky.
A steampunk airship docked above a Victorian city.
A basket of ripe apples in an autumn orchard.
A runner crossing the finish line of a marathon in the rain.
A greenhouse filled with orchids and hanging plants.
A lone tree on a hill under a sky full of stars.
A grandmother knitting a scarf in a rocking chair.
A colorful parrot sitting on a pirate's shoulder.
A modern kitchen with marble counters and copper pots.
A volcano erupting at night with glowing lava flows.
A deer drinking from a stream in a quiet forest.
A bakery window displaying croissants and fruit tarts.
A chess board mid-game with dramatic side lighting.
A surfer riding a huge wave at golden hour.
A paper lantern festival on a river in the evening.
A knight in shining armor standing in a field of poppies.
A close-up of a honeybee collecting pollen from lavender.
A rainy window with blurred city lights behind it.
A vintage typewriter with a half-written letter.
A polar bear walking across sea ice under a pale sun.
A crowded rooftop party overlooking the city skyline.
An illustration of a fairy tale cottage in a mushroom forest.
A bowl of fresh salad with tomatoes, cucumbers and feta cheese.
A marching band parading down a main street.
A mountain climber reaching a snowy summit.
A gothic cathedral interior with stained glass windows.
A kitten playing with a ball of yarn on a wooden floor.
A sunrise over a foggy rice terrace in Bali.
A scientist looking through a microscope in a bright laboratory.
A row of colorful houses along a canal in Amsterdam.
A plate of tacos with lime wedges and cilantro.
A ballet dancer leaping across an empty stage.
An old man feeding pigeons in a city park.
A spaceship landing on an alien planet with two moons.
A wooden cabin beside a lake with a canoe at the dock.
A field of lavender in Provence under a blue sky.
A giraffe eating leaves from the top of an acacia tree.
A still life of lemons, grapes and a silver pitcher.
A busy construction site with cranes and steel beams.
A lighthouse beam cutting through thick fog.
A cat wearing tiny sunglasses lounging by a swimming pool.
A quiet classroom with chalk drawings on the blackboard.
A candlelit dinner table set for two.
A flock of flamingos standing in a shallow lagoon.
A cobblestone street in a small Italian village.
A comic book panel of a superhero flying over the city.
A pile of autumn leaves with a rake leaning against a fence.
A frozen waterfall glistening in the winter sun.
A camel caravan crossing sand dunes at dusk.
A portrait of a musician holding a saxophone.
A science fiction corridor with glowing blue panels.
A garden gnome standing among blooming roses.
A rustic barn in the countryside after a light snowfall.
A bowl of tomato soup with a grilled cheese sandwich.
A crowd cheering at an outdoor music festival.
A miniature village built from cardboard and paper.
A tiger resting in the shade of tall grass.
A historic steam locomotive crossing a stone viaduct.
A hand-drawn diagram of the solar system.
A baker kneading dough on a floured countertop.
A city park in spring with cherry blossoms in full bloom.
A reflection of mountains in a perfectly still lake.
Quick brown foxes jump over lazy dogs; zebras quietly vex jumping wizards.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9, 10%, $20, #1, @home, and 3.14!
Questions? Yes: what, where, when, why, who, which, how - and whose?
"""


def build_tokenizer(out_dir: str | Path) -> Path:
    """Train the tokenizer and write the four umT5 tokenizer files into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece()
    with tempfile.TemporaryDirectory() as tmp:
        # transformers converts a SentencePiece model to tokenizer.json only on load.
        (Path(tmp) / "spiece.model").write_bytes(model)
        tokenizer = T5Tokenizer.from_pretrained(tmp, extra_ids=EXTRA_IDS)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer: expected {VOCAB_SIZE} tokens, found {len(tokenizer)}")
    tokenizer.save_pretrained(out)
    (out / "spiece.model").write_bytes(model)
    # transformers 5 no longer writes special_tokens_map.json; the umT5 folder has one.
    special = {
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(EXTRA_IDS)],
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def train_sentencepiece() -> bytes:
    """The serialized SentencePiece unigram model (same bytes on every run)."""
    spm.set_random_generator_seed(SEED)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=SPM_PIECES,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buffer.getvalue()
