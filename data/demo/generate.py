"""Generate the bundled demo data: extract a person's name, age and city from a sentence and
answer with one line of JSON in a fixed key order. A small instruct model answers in prose or
markdown before fine-tuning and in the exact format after.

    python data/demo/generate.py      # rewrites train.jsonl and test.jsonl (deterministic)
"""

import json
import random
from pathlib import Path

NAMES = """Maria Jonas Aiko Tomasz Priya Kwame Lucia Omar Ingrid Mateo Chen Fatima Sven Amara Diego Yuki
Noah Leila Pavel Zara Hugo Nadia Ravi Elena Kofi Mia Arjun Sofia Emil Hana Luca Ines Tariq Freya Bruno Mei
Oscar Anya Felix Rosa Idris Clara Kenji Layla Marco Nora Samir Greta Tobias Alma Rafael Vera Joon Selma Otto
Lina Hamza Ada Viktor Paula""".split()
CITIES = """Lisbon Oslo Nairobi Kyoto Lima Krakow Accra Montreal Porto Seville Hanoi Tunis Bergen Dakar Quito
Bologna Osaka Tallinn Zurich Cairo Denver Perth Munich Dublin Manila Ghent Leeds Malmo Cusco Turin Riga Hobart
Lyon Bilbao Fukuoka Split Gdansk Galway Austin Tartu""".split()
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{city} is home to {name}, who turned {age} this year.",
    "At {age}, {name} moved to {city} for work.",
    "Our new colleague {name} ({age}) joins us from the {city} office.",
    "Born {age} years ago, {name} still lives in {city}.",
    "The winner, {name} of {city}, is {age}.",
    "{name}, {age}, runs a small bakery in {city}.",
]
PROMPTS = [
    "Extract the person's name, age and city as JSON.",
    "Return the name, age and city from this text as JSON.",
    "Give me the person's details (name, age, city) in JSON.",
]


def row(rng: random.Random) -> dict:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"instruction": rng.choice(PROMPTS), "input": sentence, "output": answer}


def main() -> None:
    rng = random.Random(1234)
    here = Path(__file__).parent
    for name, n in (("train.jsonl", 640), ("test.jsonl", 48)):
        with (here / name).open("w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(row(rng)) + "\n")


if __name__ == "__main__":
    main()
