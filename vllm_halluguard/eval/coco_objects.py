"""COCO-80 synonym table used by CHAIR (data only).

``SYNONYM_LINES`` holds one line per COCO category: the canonical category name ("node word")
first, then its synonyms. The lines reproduce ``data/synonyms.txt`` of the CHAIR reference code
verbatim, quirks included (a doubled space before "motor bike" and "cheesecake", the capitalised
"iPhone", repeated entries, trailing spaces); :mod:`vllm_halluguard.eval.chair` decides how they
are parsed. Long lines are split with implicit string concatenation only.

Source: https://github.com/LisaAnne/Hallucination (``data/synonyms.txt``), from
A. Rohrbach, L. A. Hendricks, K. Burns, T. Darrell, K. Saenko, "Object Hallucination in Image
Captioning", EMNLP 2018. The repository README states "License: BSD 2-Clause license"; it ships
no separate licence file naming a copyright holder, so the notice below names the paper's
authors. The notice applies to the table data in this module:

    Copyright (c) 2018, Anna Rohrbach, Lisa Anne Hendricks, Kaylee Burns, Trevor Darrell,
    Kate Saenko. All rights reserved.

    Redistribution and use in source and binary forms, with or without modification, are
    permitted provided that the following conditions are met:

    1. Redistributions of source code must retain the above copyright notice, this list of
       conditions and the following disclaimer.
    2. Redistributions in binary form must reproduce the above copyright notice, this list of
       conditions and the following disclaimer in the documentation and/or other materials
       provided with the distribution.

    THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS
    OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF
    MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE
    COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
    EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE
    GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED
    AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING
    NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED
    OF THE POSSIBILITY OF SUCH DAMAGE.

The phrase rules further down (``COCO_DOUBLE_WORDS`` and friends) restate the hard-coded
special cases of the same reference scorer as data, "train track" included (it is in the
repository's latest ``utils/chair.py``, and in OPERA's Python 3 port).
"""

SYNONYM_LINES: tuple[str, ...] = (
    (
        "person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, "
        "baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, "
        "groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, "
        "snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, "
        "offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, "
        "walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, "
        "solider, hunter, shopper, villager"
    ),
    "bicycle, bike, bicycle, bike, unicycle, minibike, trike",
    "car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi",
    "motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped",
    "airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane",
    "bus, minibus, trolley",
    "train, locomotive, tramway, caboose",
    "truck, pickup, lorry, hauler, firetruck",
    (
        "boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, "
        "kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, "
        "tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, "
        "riverboat, battleship, steamship"
    ),
    "traffic light, street light, traffic signal, stop light, streetlight, stoplight",
    "fire hydrant, hydrant",
    "stop sign",
    "parking meter",
    "bench, pew",
    (
        "bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, "
        "heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, "
        "shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, "
        "gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, "
        "rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, "
        "cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird"
    ),
    "cat, kitten, feline, tabby",
    (
        "dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, "
        "collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, "
        "sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky"
    ),
    (
        "horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, "
        "bronc, bronco"
    ),
    "sheep, lamb, ram, lamb, goat, ewe",
    "cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison ",
    "elephant",
    "bear, panda",
    "zebra",
    "giraffe",
    "backpack, knapsack",
    "umbrella",
    "handbag, wallet, purse, briefcase",
    "tie, bow, bow tie",
    "suitcase, suit case, luggage",
    "frisbee",
    "skis, ski",
    "snowboard",
    "sports ball, ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard, longboard, skimboard, shortboard, wakeboard",
    "tennis racket, racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife, pocketknife, knive",
    "spoon",
    "bowl, container",
    "banana",
    "apple",
    "sandwich, burger, sub, cheeseburger, hamburger",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut, doughnut, bagel",
    "cake,  cheesecake, cupcake, shortcake, coffeecake, pancake",
    "chair, seat, stool",
    "couch, sofa, recliner, futon, loveseat, settee, chesterfield ",
    "potted plant, houseplant",
    "bed",
    "dining table, table, desk",
    "toilet, urinal, commode, toilet, lavatory, potty",
    "tv, monitor, televison, television",
    "laptop, computer, notebook, netbook, lenovo, macbook, laptop computer",
    "mouse",
    "remote",
    "keyboard",
    "cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone",
    "microwave",
    "oven, stovetop, stove, stove top oven",
    "toaster",
    "sink",
    "refrigerator, fridge, fridge, freezer",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear, teddybear",
    "hair drier, hairdryer",
    "toothbrush",
)

# Multi-word object names that are merged into one token before look-up; each maps to itself.
# fmt: off
COCO_DOUBLE_WORDS: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)

# "baby X" / "adult X" -> X, so that "baby" and "adult" do not fire as *person*.
AGE_QUALIFIED_ANIMALS: tuple[str, ...] = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)
# fmt: on

# "passenger X" -> X, so that "passenger" does not fire as *person*.
PASSENGER_VEHICLES: tuple[str, ...] = ("jet", "train")

# Phrase -> word overrides, applied after the rules above.
PHRASE_OVERRIDES: dict[str, str] = {
    "bow tie": "tie",
    "toilet seat": "toilet",
    "wine glas": "wine glass",
}
