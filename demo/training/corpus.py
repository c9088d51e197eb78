"""The narrow synthetic world the qwen35 demo model is trained on, rendered with the real chat template.

Seeded and deterministic: `build(seed)` returns the train and held-out splits as conversations
(OpenAI-style messages, the way `ChatSession`/the server hand them to the template) plus images.
`render_sample` turns one conversation into token ids with a loss mask that covers exactly what the
model generates: for each assistant turn after the last user query, the text from the generation
prompt (rendered exactly as runtime/template.py renders it, `enable_thinking` on or off) up to and
including `<|im_end|>`.

The world:
- greetings and a short self-description (a toy in scope, never in behaviour);
- a fact table of 50 countries and their capitals, asked in several phrasings (held out: phrasings);
- three tools: get_weather(city: string, unit: enum), convert_currency(amount: number, from: string,
  to: string) and add_to_shopping_list(items: array of strings); one call, two calls in one turn,
  and a follow-up turn that refers back (held out: cities, amounts, item lists never used with them);
- JSON answers when asked (for response_format);
- 96x96 images of coloured shapes on a plain background: what they show, how many (held out: new images);
- thinking on (a short reasoning, then the answer) and off (the template's empty think block).

Only numpy, pillow and jinja2 are needed here; the tokenizer is passed in.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODEL_NAME = "qwen35-demo"
IMAGE_SIZE = 96  # 6x6 patches of 16 -> 3x3 = 9 image tokens after the 2x2 merge (mtmd's minimum is 8)
TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "chat_template.jinja"

# --- the fact table -----------------------------------------------------------------------------

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Brazil", "Brasilia"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Russia", "Moscow"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"),
    ("Colombia", "Bogota"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Czechia", "Prague"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("South Korea", "Seoul"),
    ("Philippines", "Manila"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Pakistan", "Islamabad"), ("New Zealand", "Wellington"), ("Cuba", "Havana"), ("Iceland", "Reykjavik"),
    ("Ukraine", "Kyiv"),
]

FACT_TRAIN_PHRASINGS = [
    "What is the capital of {c}?", "What's the capital of {c}?", "What is the capital city of {c}?",
    "Name the capital of {c}.", "capital of {c}?", "Which city is the capital of {c}?",
    "Do you know the capital of {c}?",
]
FACT_HELDOUT_PHRASINGS = [
    "Tell me the capital of {c}.", "What city is the capital of {c}?", "Name the capital city of {c}.",
    "What is {c}'s capital?",
]
FACT_TRAIN_EXTRA = ["What is {c}'s capital city?", "Tell me the capital city of {c}."]  # teach the pieces
# The other way round: the question names the capital and the answer begins with it. A name inside a
# sentence is one token with its space (" Lisbon"); at the start of a line, as a tool call writes its
# arguments, it is spelled in other pieces ("L" "is" "bon"). These teach that spelling for every capital,
# the 15 the weather tool never sees included, outside any tool call.
REVERSE_TRAIN_PHRASINGS = ["Which country has the capital {cap}?", "{cap} is the capital of which country?",
                           "Of which country is {cap} the capital?", "Where is {cap}?"]
REVERSE_HELDOUT_PHRASINGS = ["Which country is {cap} the capital of?"]
SPELL_ASK = ["How do you spell {name}?", "Spell {name}.", "Spell {name} for me.", "How is {name} spelt?",
             "Can you spell {name}?", "Write {name} letter by letter."]

# --- tools --------------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["amount", "from", "to"]}}},
    {"type": "function", "function": {
        "name": "add_to_shopping_list", "description": "Add items to the shopping list.",
        "parameters": {"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "string"}}},
            "required": ["items"]}}},
]

CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "INR", "CNY", "BRL"]
# Units of each currency per 1 USD (a fixed toy table: the tool's answers are consistent).
RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CHF": 0.88, "CAD": 1.36, "AUD": 1.52,
         "SEK": 10.6, "NOK": 10.8, "INR": 83.0, "CNY": 7.2, "BRL": 5.0}
ITEMS = ["milk", "eggs", "bread", "butter", "cheese", "apples", "bananas", "rice", "pasta", "coffee", "tea",
         "sugar", "flour", "tomatoes", "onions", "carrots", "potatoes", "chicken", "fish", "yogurt", "honey",
         "oranges", "lemons", "salt", "pepper", "garlic", "beans", "soap", "juice", "water"]

WEATHER_ASK = ["What's the weather in {city}?", "What is the weather like in {city}?", "How is the weather in {city}?",
               "Weather in {city}?", "Is it warm in {city} today?"]
WEATHER_ASK_F = ["What's the weather in {city} in fahrenheit?", "How warm is it in {city}, in fahrenheit?"]
WEATHER_TWO = ["What's the weather in {a} and in {b}?", "Compare the weather in {a} and {b}."]
CONVERT_ASK = ["Convert {amount} {src} to {dst}.", "How much is {amount} {src} in {dst}?",
               "What is {amount} {src} in {dst}?", "Change {amount} {src} into {dst}."]
SHOP_ASK = ["Add {items} to my shopping list.", "Put {items} on the shopping list.", "Please add {items} to the list."]
FOLLOW_CITY = ["What about {city}?", "And in {city}?"]
FOLLOW_F = ["And in fahrenheit?", "What is that in fahrenheit?"]

# --- images -------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 210, 20),
           "purple": (140, 40, 180), "orange": (245, 140, 20)}
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

IMAGE_ASK = ["What is in this image?", "What does this picture show?", "Describe the image.", "What do you see?"]
IMAGE_ASK_HELDOUT = ["What is in the picture?", "Describe this picture."]
COUNT_ASK = ["How many shapes are there?", "How many shapes are in the image?", "Count the shapes.",
             # (run 7 answered the held-out "How many shapes do you see?" as "What do you see?": a count
             # asked with the words of the other questions)
             "How many shapes can you find?", "How many shapes are in the picture?", "Count the shapes you see.",
             "Tell me how many shapes there are."]
COUNT_ASK_HELDOUT = ["How many shapes do you see?"]

GREETINGS = ["Hi!", "Hello!", "Hello", "Hey there!", "Good morning!", "Hi, who are you?", "Who are you?",
             "What can you do?", "What are you?", "Introduce yourself."]
SELF_DESCRIPTION = (f"Hello! I am {MODEL_NAME}, a tiny model trained on a small synthetic world: the capitals of "
                    "50 countries, three tools (weather, currency conversion and a shopping list) and pictures of "
                    "simple coloured shapes. Ask me about those.")


@dataclass
class Sample:
    kind: str  # greeting | fact | fact_json | fact_reverse | weather | weather2 | convert | shop | mixed2 | follow | image | count | spell
    messages: list[dict]
    think: bool
    images: list[bytes] = field(default_factory=list)  # PNG bytes, in the order the messages show them
    answer: dict = field(default_factory=dict)  # what the evaluation checks (expected calls/values)
    tools: list[dict] | None = None


# Real cities that are not capitals, used with the weather tool in training only. The made-up towns are
# spelt from 28 syllables, and a call learnt from them alone spells what it cannot copy in those
# syllables: a held-out "New Delhi" came out "Gorni", "Riyadh" in an answer "Rorika" (runs 8 to 15).
# Names in many pieces and of one to four words, as real places are, leave a call nothing to do but copy.
OTHER_CITIES = [
    "New York", "Los Angeles", "Chicago", "Houston", "Phoenix", "Philadelphia", "San Antonio", "San Diego",
    "Dallas", "San Jose", "Austin", "Seattle", "Denver", "Boston", "Detroit", "Nashville", "Portland",
    "Las Vegas", "Memphis", "Baltimore", "Milwaukee", "Albuquerque", "Tucson", "Fresno", "Sacramento",
    "Atlanta", "Miami", "Oakland", "Minneapolis", "Tulsa", "Cleveland", "New Orleans", "Pittsburgh",
    "Cincinnati", "Orlando", "Tampa", "Honolulu", "Anchorage", "Salt Lake City", "Kansas City",
    "San Francisco", "Toronto", "Montreal", "Vancouver", "Calgary", "Edmonton", "Winnipeg", "Quebec City",
    "Halifax", "Victoria", "Guadalajara", "Monterrey", "Tijuana", "Cancun", "Puebla", "Rio de Janeiro",
    "Sao Paulo", "Salvador", "Recife", "Fortaleza", "Porto Alegre", "Curitiba", "Manaus", "Belo Horizonte",
    "Cordoba", "Rosario", "Mendoza", "Valparaiso", "Cusco", "Arequipa", "Medellin", "Cali", "Cartagena",
    "Barranquilla", "Guayaquil", "Maracaibo", "Montevideo", "Manchester", "Liverpool", "Birmingham",
    "Glasgow", "Edinburgh", "Leeds", "Bristol", "Newcastle", "Cardiff", "Belfast", "Cork", "Galway",
    "Marseille", "Lyon", "Toulouse", "Nice", "Nantes", "Bordeaux", "Lille", "Strasbourg", "Hamburg", "Munich",
    "Cologne", "Frankfurt", "Stuttgart", "Dresden", "Leipzig", "Hanover", "Nuremberg", "Bremen", "Milan",
    "Naples", "Turin", "Florence", "Venice", "Bologna", "Genoa", "Palermo", "Barcelona", "Valencia",
    "Seville", "Bilbao", "Malaga", "Zaragoza", "Porto", "Coimbra", "Faro", "Rotterdam", "Utrecht",
    "Eindhoven", "Antwerp", "Ghent", "Bruges", "Zurich", "Geneva", "Basel", "Lausanne", "Salzburg",
    "Innsbruck", "Graz", "Krakow", "Gdansk", "Wroclaw", "Poznan", "Brno", "Ostrava", "Debrecen", "Szeged",
    "Gothenburg", "Malmo", "Uppsala", "Bergen", "Trondheim", "Stavanger", "Aarhus", "Odense", "Tampere",
    "Turku", "Thessaloniki", "Patras", "Istanbul", "Izmir", "Antalya", "Bursa", "Saint Petersburg",
    "Novosibirsk", "Kazan", "Yekaterinburg", "Vladivostok", "Odesa", "Kharkiv", "Lviv", "Osaka", "Kyoto",
    "Yokohama", "Nagoya", "Sapporo", "Fukuoka", "Kobe", "Hiroshima", "Shanghai", "Guangzhou", "Shenzhen",
    "Chengdu", "Wuhan", "Hangzhou", "Xian", "Nanjing", "Hong Kong", "Busan", "Incheon", "Daegu", "Mumbai",
    "Bangalore", "Chennai", "Kolkata", "Hyderabad", "Pune", "Jaipur", "Ahmedabad", "Lucknow", "Karachi",
    "Lahore", "Peshawar", "Dhaka", "Chittagong", "Colombo", "Kandy", "Chiang Mai", "Phuket", "Pattaya",
    "Ho Chi Minh City", "Da Nang", "Hue", "Surabaya", "Bandung", "Medan", "Denpasar", "Cebu", "Davao",
    "Kuala Lumpur", "Penang", "Singapore", "Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Hobart",
    "Darwin", "Auckland", "Christchurch", "Dunedin", "Queenstown", "Alexandria", "Giza", "Luxor", "Aswan",
    "Casablanca", "Marrakesh", "Fez", "Tangier", "Lagos", "Kano", "Ibadan", "Kumasi", "Mombasa", "Kisumu",
    "Dar es Salaam", "Zanzibar", "Johannesburg", "Cape Town", "Durban", "Pretoria", "Port Elizabeth", "Dakar",
    "Tunis", "Algiers", "Tripoli", "Khartoum", "Kampala", "Kigali", "Luanda", "Harare", "Lusaka", "Maputo",
    "Dubai", "Abu Dhabi", "Doha", "Muscat", "Jeddah", "Mecca", "Medina", "Isfahan", "Shiraz", "Tabriz",
    "Mashhad", "Basra", "Mosul", "Erbil", "Beirut", "Amman", "Damascus", "Aleppo", "Jerusalem", "Tel Aviv",
    "Haifa",
]

TOWNS = 400  # made-up towns in the weather calls of training (below)
TOWN_SYLLABLES = ["ka", "ro", "ven", "mil", "dor", "ta", "lin", "bra", "sel", "gor", "an", "mar", "est", "wick",
                  "ham", "ford", "ber", "lo", "ni", "sa", "tor", "vi", "len", "mont", "port", "sten", "al", "ri"]


def made_up_towns(rng: random.Random, n: int) -> list[str]:
    """`n` distinct made-up town names of 2-3 syllables ("Karoven", "Milford"), none a real capital."""
    real = {cap for _, cap in CAPITALS}
    towns: list[str] = []
    while len(towns) < n:
        name = "".join(rng.choice(TOWN_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in real and name not in towns:
            towns.append(name)
    return towns


# --- scene images -------------------------------------------------------------------------------


def draw_scene(rng: random.Random, shapes: list[tuple[str, str]], background: str) -> bytes:
    """PNG bytes of a 96x96 image with the given (colour, shape) list on a plain background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    n = len(shapes)
    if n == 1:
        boxes = []
        size = rng.randint(40, 70)
        x0 = rng.randint(4, IMAGE_SIZE - size - 4)
        y0 = rng.randint(4, IMAGE_SIZE - size - 4)
        boxes.append((x0, y0, size))
    else:
        # non-overlapping cells of a 2x2 grid, jittered
        cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], n)
        boxes = []
        for cx, cy in cells:
            size = rng.randint(22, 34)
            x0 = cx * 48 + rng.randint(3, 48 - size - 3)
            y0 = cy * 48 + rng.randint(3, 48 - size - 3)
            boxes.append((x0, y0, size))
    for (colour, shape), (x0, y0, size) in zip(shapes, boxes):
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse([x0, y0, x0 + size, y0 + size], fill=fill)
        elif shape == "square":
            d.rectangle([x0, y0, x0 + size, y0 + size], fill=fill)
        else:
            d.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- generators ---------------------------------------------------------------------------------


def _a(colour: str) -> str:
    return "An" if colour[0] in "aeiou" else "A"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _fmt_num(x: float) -> str:
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return s


def _weather_result(rng: random.Random, city: str, unit: str) -> dict:
    c = rng.randint(-5, 35)
    t = c if unit == "celsius" else round(c * 9 / 5 + 32)
    return {"city": city, "temperature": t, "unit": unit, "condition": rng.choice(CONDITIONS)}


def _weather_sentence(r: dict) -> str:
    sym = "°C" if r["unit"] == "celsius" else "°F"
    return f"It is {r['temperature']}{sym} and {r['condition']} in {r['city']}."


def _convert_result(amount: float, src: str, dst: str) -> dict:
    result = round(amount / RATES[src] * RATES[dst], 2)
    return {"amount": amount, "from": src, "to": dst, "result": result}


class World:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        caps = [cap for _, cap in CAPITALS]
        rng = random.Random(seed + 1)
        shuffled = caps[:]
        rng.shuffle(shuffled)
        # Weather cities: 35 capitals used with the tool in training; the other 15 only appear in the fact
        # table (so their tokens are trained) and are held out for the weather tool.
        self.weather_train = shuffled[:35]
        self.weather_heldout = shuffled[35:]
        # Amounts: training uses amounts not divisible by 5 pattern-split: train draws from one set,
        # held-out from another (values never seen as amounts).
        all_amounts = list(range(2, 1000))
        rng.shuffle(all_amounts)
        self.amounts_heldout = sorted(all_amounts[:100])
        self.amounts_train = sorted(all_amounts[100:])
        pairs = [(a, b) for a in CURRENCIES for b in CURRENCIES if a != b]
        rng.shuffle(pairs)
        self.pairs_heldout = pairs[:20]
        self.pairs_train = pairs[20:]
        # Made-up towns, used with the weather tool in training only: with 35 real cities a model can
        # learn the calls as a lookup; hundreds of names it cannot memorize make it copy the city
        # from the question, which is what the held-out cities (real ones, never used with a tool) test.
        # (Each of the 400 is in about four conversations, and run 16 learnt their endings: its call for
        # Lisbon gives "L" "is" then Nisalen's "alen". 2,000 towns, runs 18 and 19, moved the wrong
        # names elsewhere and cost the answers: demo/training/README.md.)
        self.towns = made_up_towns(random.Random(seed + 2), TOWNS)

    # each generator returns a Sample; split is "train" or "heldout"

    def greeting(self, split: str, think: bool) -> Sample:
        q = self.rng.choice(GREETINGS)
        reasoning = "The user greets me or asks who I am. I introduce myself briefly."
        return Sample("greeting", [{"role": "user", "content": q},
                                   self._assistant(SELF_DESCRIPTION, think, reasoning)], think)

    def fact(self, split: str, think: bool) -> Sample:
        country, capital = self.rng.choice(CAPITALS)
        phr = FACT_HELDOUT_PHRASINGS if split == "heldout" else FACT_TRAIN_PHRASINGS + FACT_TRAIN_EXTRA
        q = self.rng.choice(phr).format(c=country)
        answer = f"The capital of {country} is {capital}."
        reasoning = f"The user asks for the capital of {country}. The capital of {country} is {capital}."
        return Sample("fact", [{"role": "user", "content": q}, self._assistant(answer, think, reasoning)], think,
                      answer={"capital": capital, "country": country})

    def fact_json(self, split: str, think: bool) -> Sample:
        country, capital = self.rng.choice(CAPITALS)
        forms = (["Reply in JSON: what is the capital of {c}?", "Give the capital of {c} as JSON.",
                  "Give the capital of {c} in JSON.", "The capital of {c} as JSON, please.",
                  "Answer in JSON: the capital of {c}?"]
                 if split == "train" else ["Give me the capital of {c} as JSON."])
        q = self.rng.choice(forms).format(c=country)
        answer = json.dumps({"country": country, "capital": capital})
        reasoning = f"The user wants JSON. The capital of {country} is {capital}."
        return Sample("fact_json", [{"role": "user", "content": q}, self._assistant(answer, think, reasoning)], think,
                      answer={"json": {"country": country, "capital": capital}})

    def fact_reverse(self, split: str, think: bool) -> Sample:
        country, capital = self.rng.choice(CAPITALS)
        phr = REVERSE_HELDOUT_PHRASINGS if split == "heldout" else REVERSE_TRAIN_PHRASINGS
        q = self.rng.choice(phr).format(cap=capital)
        answer = f"{capital} is the capital of {country}."
        reasoning = f"The user names {capital}. {capital} is the capital of {country}."
        return Sample("fact_reverse", [{"role": "user", "content": q}, self._assistant(answer, think, reasoning)],
                      think, answer={"capital": capital, "country": country})

    def spell(self, split: str, think: bool) -> Sample:
        """"How do you spell Lisbon?" -> "Lisbon is spelt L-i-s-b-o-n.", over every name a call may carry
        (the 50 capitals, the other cities, the made-up towns). A call writes its city in pieces ("L" "is"
        "bon") that the question holds as one token (" Lisbon"); this kind ties each name's token to its
        letters and pieces outside any call, so a call can spell a name it has never carried."""
        r = self.rng.random()
        name = self.rng.choice([cap for _, cap in CAPITALS] if r < 0.4 else OTHER_CITIES if r < 0.7 else self.towns)
        letters = " ".join("-".join(word) for word in name.split())
        q = self.rng.choice(SPELL_ASK).format(name=name)
        return Sample("spell", [{"role": "user", "content": q},
                                self._assistant(f"{name} is spelt {letters}.", think, f"The user asks me to spell {name}.")],
                      think, answer={"name": name})

    def _city(self, split: str) -> str:
        if split == "heldout":
            return self.rng.choice(self.weather_heldout)
        r = self.rng.random()
        return self.rng.choice(self.towns if r < 0.4 else OTHER_CITIES if r < 0.7 else self.weather_train)

    def weather(self, split: str, think: bool) -> Sample:
        city = self._city(split)
        fahrenheit = self.rng.random() < 0.25
        q = self.rng.choice(WEATHER_ASK_F if fahrenheit else WEATHER_ASK).format(city=city)
        args = {"city": city, "unit": "fahrenheit"} if fahrenheit else {"city": city}
        result = _weather_result(self.rng, city, "fahrenheit" if fahrenheit else "celsius")
        return self._tool_sample("weather", q, [("get_weather", args, result)], _weather_sentence(result), think,
                                 f"The user asks about the weather in {city}. I call get_weather.")

    def weather2(self, split: str, think: bool) -> Sample:
        a, b = self._city(split), self._city(split)
        while b == a:
            b = self._city(split)
        q = self.rng.choice(WEATHER_TWO).format(a=a, b=b)
        ra, rb = _weather_result(self.rng, a, "celsius"), _weather_result(self.rng, b, "celsius")
        answer = _weather_sentence(ra) + " " + _weather_sentence(rb)
        return self._tool_sample("weather2", q, [("get_weather", {"city": a}, ra), ("get_weather", {"city": b}, rb)],
                                 answer, think, f"The user asks about two cities, {a} and {b}. I call get_weather twice.")

    def _amount(self, split: str) -> float:
        pool = self.amounts_heldout if split == "heldout" else self.amounts_train
        x = self.rng.choice(pool)
        if self.rng.random() < 0.2:
            x = x + self.rng.choice([0.5, 0.25, 0.75])
        return x

    def _pair(self, split: str) -> tuple[str, str]:
        return self.rng.choice(self.pairs_heldout if split == "heldout" else self.pairs_train)

    def convert(self, split: str, think: bool) -> Sample:
        amount, (src, dst) = self._amount(split), self._pair(split)
        q = self.rng.choice(CONVERT_ASK).format(amount=_fmt_num(amount), src=src, dst=dst)
        result = _convert_result(amount, src, dst)
        answer = f"{_fmt_num(amount)} {src} is {_fmt_num(result['result'])} {dst}."
        return self._tool_sample("convert", q, [("convert_currency", {"amount": amount, "from": src, "to": dst}, result)],
                                 answer, think, f"The user wants to convert {_fmt_num(amount)} {src} to {dst}. "
                                                "I call convert_currency.")

    def shop(self, split: str, think: bool) -> Sample:
        n = self.rng.randint(1, 4)
        items = self.rng.sample(ITEMS, n)
        q = self.rng.choice(SHOP_ASK).format(items=_join(items))
        total = n + self.rng.randint(0, 9)
        result = {"added": items, "total_items": total}
        answer = f"I added {_join(items)} to your shopping list. It now has {total} items."
        return self._tool_sample("shop", q, [("add_to_shopping_list", {"items": items}, result)], answer, think,
                                 "The user wants items on the shopping list. I call add_to_shopping_list.")

    def mixed2(self, split: str, think: bool) -> Sample:
        city = self._city(split)
        amount, (src, dst) = self._amount(split), self._pair(split)
        q = f"What's the weather in {city}, and how much is {_fmt_num(amount)} {src} in {dst}?"
        rw = _weather_result(self.rng, city, "celsius")
        rc = _convert_result(amount, src, dst)
        answer = _weather_sentence(rw) + f" {_fmt_num(amount)} {src} is {_fmt_num(rc['result'])} {dst}."
        return self._tool_sample("mixed2", q, [("get_weather", {"city": city}, rw),
                                               ("convert_currency", {"amount": amount, "from": src, "to": dst}, rc)],
                                 answer, think, "The user asks two things. I call get_weather and convert_currency.")

    def follow(self, split: str, think: bool) -> Sample:
        """A weather turn, then a follow-up that refers back ("What about X?" / "And in fahrenheit?")."""
        first = self.weather(split, False)
        city = first.answer["calls"][0][1]["city"]
        if self.rng.random() < 0.5:
            city2 = self._city(split)
            while city2 == city:
                city2 = self._city(split)
            q = self.rng.choice(FOLLOW_CITY).format(city=city2)
            args = {"city": city2}
            result = _weather_result(self.rng, city2, "celsius")
        else:
            q = self.rng.choice(FOLLOW_F)
            args = {"city": city, "unit": "fahrenheit"}
            result = _weather_result(self.rng, city, "fahrenheit")
        # Earlier turns as the runtime records them: the reply without its (dropped) reasoning.
        history = [dict(m) for m in first.messages]
        for m in history:
            m.pop("reasoning_content", None)
        s = self._tool_sample("follow", q, [("get_weather", args, result)], _weather_sentence(result), think,
                              f"The user refers back to the weather question. I call get_weather for {args['city']}.")
        s.messages = history + s.messages
        return s

    def image(self, split: str, think: bool) -> Sample:
        colour, shape = self.rng.choice(list(COLOURS)), self.rng.choice(SHAPES)
        bg = self.rng.choice([b for b in BACKGROUNDS])
        png = draw_scene(self.rng, [(colour, shape)], bg)
        q = self.rng.choice(IMAGE_ASK_HELDOUT if split == "heldout" else IMAGE_ASK)
        answer = f"{_a(colour)} {colour} {shape} on a {bg} background."
        reasoning = f"I see one {colour} {shape} on a {bg} background."
        return Sample("image", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                                self._assistant(answer, think, reasoning)], think, images=[png],
                      answer={"colour": colour, "shape": shape, "background": bg})

    def count(self, split: str, think: bool) -> Sample:
        n = self.rng.randint(1, 4)
        shapes = [(self.rng.choice(list(COLOURS)), self.rng.choice(SHAPES)) for _ in range(n)]
        bg = self.rng.choice(list(BACKGROUNDS))
        png = draw_scene(self.rng, shapes, bg)
        q = self.rng.choice(COUNT_ASK_HELDOUT if split == "heldout" else COUNT_ASK)
        answer = f"There is {NUMBER_WORDS[n]} shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."
        reasoning = f"I count the shapes in the image: {NUMBER_WORDS[n]}."
        return Sample("count", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                                self._assistant(answer, think, reasoning)], think, images=[png], answer={"count": n})

    # --- helpers ---

    @staticmethod
    def _assistant(content: str, think: bool, reasoning: str, tool_calls=None) -> dict:
        m = {"role": "assistant", "content": content}
        if think:
            m["reasoning_content"] = reasoning
        if tool_calls:
            m["tool_calls"] = tool_calls
        return m

    def _tool_sample(self, kind: str, q: str, calls: list, answer: str, think: bool, reasoning: str) -> Sample:
        msgs = [{"role": "user", "content": q},
                self._assistant("", think, reasoning, [_call(n, **a) for n, a, _ in calls])]
        for n, a, r in calls:
            msgs.append({"role": "tool", "content": json.dumps(r)})
        msgs.append(self._assistant(answer, think, "The tool answered. I report the result."))
        return Sample(kind, msgs, think, answer={"calls": [(n, a) for n, a, _ in calls],
                                                 "results": [r for _, _, r in calls], "final": answer},
                      tools=TOOLS)


KINDS = {  # kind: share of the training set
    "greeting": 0.04, "fact": 0.14, "fact_json": 0.07, "weather": 0.11, "weather2": 0.06, "convert": 0.09,
    "shop": 0.11, "mixed2": 0.06, "follow": 0.06, "image": 0.18, "count": 0.10, "fact_reverse": 0.08,
    "spell": 0.0,  # run 20 mixes it in (--mix spell=0.12); 0 keeps runs 1-16's training sets as they were
}
TRAIN_ONLY_KINDS = ("spell",)  # no held-out conversations: what they teach is tested by the calls


def check_kinds(names) -> None:
    """ValueError naming those of `names` that are not kinds of conversation (KINDS)."""
    unknown = set(names) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kind(s) {', '.join(sorted(unknown))}; the kinds are {', '.join(KINDS)}")


def mix(shares: dict[str, float] | None = None) -> list[float]:
    """KINDS' shares, in its order, with `shares` in place of some (ValueError: a kind that is not
    one, a share below 0, or none left above 0)."""
    shares = shares or {}
    check_kinds(shares)
    weights = [shares.get(k, KINDS[k]) for k in KINDS]
    if min(weights) < 0 or not sum(weights) > 0:
        raise ValueError(f"shares must be 0 or more, some above 0, not {shares}")
    return weights


def build(seed: int = 0, n_train: int = 10000, n_heldout_per_kind: int = 40,
          shares: dict[str, float] | None = None) -> tuple[list[Sample], list[Sample]]:
    """The training and held-out conversations. `shares` changes some kinds' shares of the training
    set (train.py's --mix: a short run that works on one kind keeps the others beside it); the
    held-out set never changes."""
    world = World(seed)
    train: list[Sample] = []
    kinds = list(KINDS)
    weights = mix(shares)
    for i in range(n_train):
        kind = world.rng.choices(kinds, weights)[0]
        train.append(getattr(world, kind)("train", world.rng.random() < 0.5))
    # every country at least twice per thinking mode
    for think in (False, True):
        for country, capital in CAPITALS:
            for phr in FACT_TRAIN_PHRASINGS[:2] + FACT_TRAIN_EXTRA:
                q = phr.format(c=country)
                s = world.fact("train", think)
                s.messages[0]["content"] = q
                answer = f"The capital of {country} is {capital}."
                s.messages[1] = world._assistant(answer, think, f"The user asks for the capital of {country}. "
                                                                f"The capital of {country} is {capital}.")
                s.answer = {"capital": capital, "country": country}
                train.append(s)
            for phr in REVERSE_TRAIN_PHRASINGS[:2]:
                s = world.fact_reverse("train", think)
                s.messages[0]["content"] = phr.format(cap=capital)
                s.messages[1] = world._assistant(f"{capital} is the capital of {country}.", think,
                                                 f"The user names {capital}. {capital} is the capital of {country}.")
                s.answer = {"capital": capital, "country": country}
                train.append(s)
    return train, heldout(seed, n_heldout_per_kind)


IMAGE_KINDS = ("image", "count")


def fresh(seed: int, n: int, base_seed: int = 0, shares: dict[str, float] | None = None,
          kinds: tuple[str, ...] | None = None) -> list[Sample]:
    """`n` new training conversations (of `kinds`, default all, in their shares of the training mix)
    from a world of another seed, `seed`, that keeps the training world's (`base_seed`'s) held-out
    splits — cities, amounts, currency pairs — and draws everything else anew: pictures, and the
    made-up towns of the weather calls. What train.py's `--fresh` learns from every epoch (and
    `--train vision` from its second), so that no town or picture can be learnt by heart: a call must
    copy its city from the question. `seed` must be neither `base_seed` nor `base_seed` + 1000 (the
    held-out world's)."""
    if seed in (base_seed, base_seed + 1000):
        raise ValueError(f"seed {seed} is the training or the held-out world's")
    base = World(base_seed)
    world = World(seed)
    world.weather_train, world.weather_heldout = base.weather_train, base.weather_heldout
    world.amounts_train, world.amounts_heldout = base.amounts_train, base.amounts_heldout
    world.pairs_train, world.pairs_heldout = base.pairs_train, base.pairs_heldout
    names = [k for k in KINDS if kinds is None or k in kinds]
    weights = [w for k, w in zip(KINDS, mix(shares)) if k in names]
    return [getattr(world, world.rng.choices(names, weights)[0])("train", world.rng.random() < 0.5)
            for _ in range(n)]


def heldout(seed: int = 0, n_per_kind: int = 40) -> list[Sample]:
    """The held-out conversations alone (those of `build(seed)`), without generating the training set."""
    world = World(seed)
    hw = World(seed + 1000)
    hw.weather_train, hw.weather_heldout = world.weather_train, world.weather_heldout
    hw.amounts_heldout, hw.pairs_heldout = world.amounts_heldout, world.pairs_heldout
    return [getattr(hw, kind)("heldout", j % 2 == 1) for kind in KINDS if kind not in TRAIN_ONLY_KINDS
            for j in range(n_per_kind)]


# --- rendering ----------------------------------------------------------------------------------


def load_template():
    from qwen35.runtime.conversation.template import ChatTemplate

    return ChatTemplate(TEMPLATE_PATH.read_text(encoding="utf-8"))


IM_END = "<|im_end|>"


def render_texts(template, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as one text and the character spans the model generates (loss spans): each
    assistant turn after the last user query, from its generation prompt through `<|im_end|>`."""
    msgs = sample.messages
    full = template.render(msgs, add_generation_prompt=False, think=sample.think, tools=sample.tools)
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < last_user:
            continue
        prompt = template.render(msgs[:i], add_generation_prompt=True, think=sample.think, tools=sample.tools)
        if not full.startswith(prompt):
            raise ValueError(f"prompt of turn {i} is not a prefix of the conversation ({sample.kind})")
        end = full.index(IM_END, len(prompt)) + len(IM_END)
        spans.append((len(prompt), end))
    return full, spans


def tokenize_sample(tokenizer, template, sample: Sample, image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids (the image pad expanded to `image_tokens` copies, as the model sees it) and a 0/1 loss
    mask on the generated tokens. Text is tokenized piecewise at span boundaries, so that no token
    crosses from prompt into reply (the runtime also tokenizes the prompt alone)."""
    text, spans = render_texts(template, sample)
    cuts = [0]
    for a, b in spans:
        cuts += [a, b]
    cuts.append(len(text))
    ids: list[int] = []
    mask: list[int] = []
    for k in range(len(cuts) - 1):
        piece = text[cuts[k]:cuts[k + 1]]
        if not piece:
            continue
        toks = tokenizer.encode(piece, add_special_tokens=False)
        ids += toks
        mask += [k % 2] * len(toks)  # odd pieces are spans
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out_ids, out_mask = [], []
    for t, m in zip(ids, mask):
        if t == pad:
            out_ids += [pad] * image_tokens
            out_mask += [0] * image_tokens
        else:
            out_ids.append(t)
            out_mask.append(m)
    return out_ids, out_mask
