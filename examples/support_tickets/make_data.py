"""Generate the support-ticket extraction demo data for lorakit.

Task: turn a short customer-support ticket into one compact JSON object with the keys
category, priority, order_id, product, sentiment (always in that order). Every label can be
read off the ticket text:

  category   billing | shipping | returns | technical | account  -- what the issue sentence is about
  priority   low | medium | high | urgent                         -- a cue phrase ("no rush", "asap", "URGENT!")
  order_id   "ORD-12345" or null  -- copied from the text ("ORD-12345", "order #12345", "order number 12345")
  product    a catalog name (lowercase) or null -- the product named in the text, any capitalisation
  sentiment  positive | neutral | negative  -- a tone cue (thanks/love, none or factual, angry/disappointed)

The held-out set uses a different seed, and about 40% of its tickets use issue templates (and
often cue phrasings, greetings, sign-offs) from HELD_OUT pools that train never sees.
Stdlib only, deterministic: running it twice gives byte-identical files.

Regenerate with:  python examples/support_tickets/make_data.py
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "Extract the support ticket as JSON with keys category, priority, order_id, product, sentiment."
N_TRAIN, N_EVAL = 480, 100
TRAIN_SEED, EVAL_SEED = 1234, 5678
EVAL_NOVEL_SHARE = 0.4  # share of eval tickets built around a held-out issue template

# Products: electronics can also appear in technical tickets; everything can be billed, shipped, returned.
ELECTRONICS = ["wireless earbuds", "smart watch", "bluetooth speaker", "fitness tracker", "phone charger",
               "webcam", "mechanical keyboard", "wireless mouse", "e-reader", "robot vacuum", "smart plug",
               "coffee grinder", "electric kettle", "air purifier", "desk lamp"]
OTHER = ["laptop stand", "yoga mat", "water bottle", "backpack", "running shoes", "office chair",
         "throw blanket", "phone case", "travel mug", "hoodie"]

# Issue sentences per category: (train pool, held-out pool). "{p}" = a product; no "{p}" -> product null.
ISSUES = {
    "billing": ([
        "I was charged twice for the {p}.",
        "My card got billed two times for one order.",
        "I see a double charge on my statement for the {p}.",
        "I was promised a refund for the {p} but it never showed up on my card.",
        "The invoice shows the wrong amount for my {p}.",
        "I need a copy of the invoice for my {p}.",
        "You charged me full price for the {p} during the sale.",
        "There's a charge on my card from your store that I don't recognize.",
        "My promo code wasn't applied and I got charged extra.",
        "I was billed for shipping on the {p} but it said free shipping.",
    ], [
        "The payment for my {p} went through twice.",
        "My bank shows two identical payments to you.",
        "Still waiting on the refund for the {p}, it was approved last week.",
        "Can I get a corrected receipt for the {p}? The tax is wrong.",
    ]),
    "shipping": ([
        "My package still hasn't arrived.",
        "My {p} order was supposed to arrive last week.",
        "Tracking says delivered but there's no {p} at my door.",
        "The tracking number you sent doesn't work.",
        "My {p} order has been stuck in transit for ten days.",
        "The courier lost my package with the {p}.",
        "Tracking hasn't updated in a week.",
        "My order shipped to my old address.",
        "The box arrived but there was no {p} inside.",
        "When will my {p} ship? It still says processing.",
    ], [
        "The delivery date for my {p} keeps getting pushed back.",
        "The courier marked my parcel as undeliverable.",
        "I've been waiting three weeks for the {p} to show up.",
        "No movement on tracking for my {p} since Monday.",
    ]),
    "returns": ([
        "I'd like to return the {p}.",
        "I got the wrong size {p}, can I exchange it?",
        "How do I send back the {p}? I don't need it anymore.",
        "I want to exchange the {p} for a different color.",
        "Can I get a return label for the {p}?",
        "The size of the {p} is off, I need a bigger one.",
        "I changed my mind about the {p} and want to return it.",
        "The {p} didn't match the photos, I want to send it back.",
        "Is it too late to return the {p}? I bought it 20 days ago.",
        "I want to return my whole order.",
    ], [
        "Please swap the {p} for a smaller size.",
        "I'd like to send the {p} back for an exchange.",
        "What's your return policy? The {p} did not meet my expectations.",
    ]),
    "technical": ([
        "My {p} won't turn on.",
        "My {p} disconnected from my phone again.",
        "The app crashes every time I open it.",
        "My {p} won't connect to wifi.",
        "The {p} stopped charging after two days.",
        "The light on my {p} keeps flickering.",
        "My {p} started buzzing loudly and then shut off.",
        "The companion app can't find my {p}.",
        "After the update my {p} started rebooting on its own.",
        "The buttons on the {p} don't respond.",
    ], [
        "My {p} died completely, no lights at all.",
        "The {p} won't pair with my phone.",
        "The app freezes on the loading screen.",
    ]),
    "account": ([
        "I forgot my password and the reset email never comes.",
        "I can't log in to my account.",
        "Please change the email on my account to my new address.",
        "I want to delete my account.",
        "My account got locked after too many login attempts.",
        "The password reset link says it expired.",
        "I think someone else logged into my account.",
        "How do I update the phone number on my profile?",
        "Please close my account and remove my data.",
        "Two-factor codes aren't arriving so I can't sign in.",
    ], [
        "I'm locked out of my account.",
        "I need to switch my login email.",
        "Please remove my account permanently.",
    ]),
}
CATEGORY_ORDER_SHARE = {"billing": 0.8, "shipping": 0.8, "returns": 0.8, "technical": 0.8, "account": 0.2}

# Priority cues: one is always in the ticket. (train pool, held-out pool), plus sampling weight.
PRIORITY = {
    "low": (["No rush on this.", "Whenever you get a chance.", "Not urgent at all.",
             "Take your time with it.", "It's not a big deal, no rush."],
            ["No hurry whatsoever.", "Low priority, whenever works."]),
    "medium": (["Can you help?", "Could you look into this?", "Please let me know what to do.",
                "What are my options?", "Can someone check on this?"],
               ["Please advise.", "Let me know the next steps."]),
    "high": (["Please fix this asap.", "I really need this fixed.", "Please handle this soon, it's important.",
              "I need this sorted quickly.", "Please prioritize this."],
             ["Need a fix as soon as you can.", "This needs attention soon please."]),
    "urgent": (["URGENT!", "I need this resolved today or I'm disputing the charge.",
                "My business is down because of this.", "This is an emergency, please respond right away.",
                "URGENT - need help immediately."],
               ["Critical: I need this fixed within the hour.", "Emergency, my shop can't operate until this is fixed."]),
}
PRIORITY_WEIGHTS = {"low": 20, "medium": 35, "high": 25, "urgent": 20}

# Sentiment cues: neutral is usually no cue at all (a factual ticket), sometimes a flat remark.
SENTIMENT = {
    "positive": (["Thanks so much for your help!", "I really love your products.", "You guys are always great.",
                  "Really appreciate it!", "Love the store, thanks!"],
                 ["Big fan of your shop, thank you!", "Your team has been wonderful."]),
    "neutral": (["", "", "", "", "Just letting you know.", "I checked the FAQ already."],
                ["", "I looked on the website first."]),
    "negative": (["This is really frustrating.", "I'm very disappointed.", "Honestly this is a terrible experience.",
                  "I'm so annoyed right now.", "Not happy at all."],
                 ["Completely fed up with this.", "What a letdown."]),
}
SENTIMENT_WEIGHTS = {"positive": 25, "neutral": 40, "negative": 35}

# How an order id is written in the text ({n} = the 5 digits). The JSON is always "ORD-{n}".
ORDER_REFS = (["Order ORD-{n}.", "My order number is {n}.", "This is about order #{n}.", "Order #{n}.",
               "Ref: ORD-{n}.", "Order number {n}."],
              ["It's under order number {n}.", "Reference ORD-{n}."])
GREETINGS = (["Hi,", "Hello,", "Hey,", "Hi there,", "Hello team,", "Good morning,"], ["Dear support,", "Hey folks,"])
SIGNOFFS = (["- {name}", "{name}", "Regards, {name}", "Best, {name}", "Cheers, {name}"],
            ["Kind regards, {name}", "Sincerely, {name}"])
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kate", "Luis",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
TYPOS = {"the": "teh", "please": "pls", "received": "recieved", "because": "becuase", "really": "realy",
         "hasn't": "hasnt", "don't": "dont", "account": "acount", "weeks": "wks", "can't": "cant"}


def pick(rng, pools, held_out):
    """Choose from the train pool, or from the held-out pool when held_out is true."""
    return rng.choice(pools[1] if held_out else pools[0])


def weighted(rng, weights):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def styled_product(rng, name):
    """The product as a customer might type it: lowercase, Title Case or Sentence case."""
    return rng.choices([name, name.title(), name[0].upper() + name[1:]], weights=[6, 3, 1])[0]


def make_ticket(rng, category, novel):
    """One (ticket text, label dict). novel: use held-out issue template and, half the time, other held-out parts."""
    held = lambda: novel and rng.random() < 0.5  # noqa: E731 - held-out choice for the secondary parts
    template = pick(rng, ISSUES[category], novel)
    product = None
    if "{p}" in template:
        product = rng.choice(ELECTRONICS if category == "technical" else ELECTRONICS + OTHER)
    issue = template.replace("{p}", styled_product(rng, product) if product else "")
    priority = weighted(rng, PRIORITY_WEIGHTS)
    sentiment = weighted(rng, SENTIMENT_WEIGHTS)
    order_id = None
    body = [issue, pick(rng, PRIORITY[priority], held()), pick(rng, SENTIMENT[sentiment], held())]
    if rng.random() < 0.1:  # an occasional exclamation mark
        body = [s[:-1] + "!" if s.endswith(".") else s for s in body]
    if rng.random() < 0.1:  # an occasional all-lowercase ticket (order refs stay as written)
        body = [s.lower() for s in body]
    if rng.random() < CATEGORY_ORDER_SHARE[category]:
        digits = str(rng.randint(10000, 99999))
        order_id = "ORD-" + digits
        body.append(pick(rng, ORDER_REFS, held()).replace("{n}", digits))
    body = [s for s in body if s]
    if rng.random() < 0.3:  # sentences in a different order, issue not always first
        rng.shuffle(body)
    else:
        body[1:] = rng.sample(body[1:], len(body) - 1)
    text = " ".join(body)
    if rng.random() < 0.15:  # one typo
        words = [w for w in TYPOS if f" {w} " in f" {text} "]
        if words:
            w = rng.choice(words)
            text = f" {text} ".replace(f" {w} ", f" {TYPOS[w]} ", 1).strip()
    if rng.random() < 0.6:  # greeting and sign-off on their own lines, like an email
        text = pick(rng, GREETINGS, held()) + "\n" + text
    if rng.random() < 0.5:
        text += "\n" + pick(rng, SIGNOFFS, held()).replace("{name}", rng.choice(NAMES))
    label = {"category": category, "priority": priority, "order_id": order_id,
             "product": product, "sentiment": sentiment}
    return text, label


def build(n, seed, novel_share, seen):
    """n unique examples; tickets whose text is in `seen` (e.g. the train set) are skipped."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        novel = len(rows) % 10 < novel_share * 10  # an exact share, spread evenly through the file
        category = list(ISSUES)[len(rows) % len(ISSUES)]  # categories balanced and interleaved
        text, label = make_ticket(rng, category, novel)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": text},
                                  {"role": "assistant", "content": json.dumps(label, ensure_ascii=False)}]})
    return rows


def write(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    seen = set()
    train = build(N_TRAIN, TRAIN_SEED, 0.0, seen)
    evals = build(N_EVAL, EVAL_SEED, EVAL_NOVEL_SHARE, seen)
    write(HERE / "train.jsonl", train)
    write(HERE / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval examples to {HERE}")


if __name__ == "__main__":
    main()
