#!/usr/bin/env python3
"""Generate the small bilingual (English + Chinese) demo corpus in ``data/demo/``.

The corpus is written by this project (no third-party text). It describes a fictional
world of towns. Every town ("entity") has ten attributes (founding year, population,
main industry, climate, best-known landmark, river, signature dish, yearly festival,
elevation, most famous native). For every attribute there are 4-5 passage templates and
5 question templates; questions avoid the passage wording where possible ("The economy
of Belmora rests mainly on shipbuilding." / "How do people in Belmora earn a living?").
Every passage of a town names the town, so a retriever must tell the *attribute*
apart, not just the town: the other passages of the same town are hard negatives.
Half of the retrieval-style passages (weak pairs, retrieval positives, cls passages,
retrieval eval corpus) carry a generic second sentence ("Most people there know each
other by name.") that never answers a question but makes passages of one town more
alike and sets lexical traps for a model that matches words, not meaning. STS sentences
have no such sentence. The Chinese templates are written natively, not translated.

Entities per language (disjoint): 120 training towns, 40 held-out evaluation towns and
10 distractor towns (distractors only appear as extra passages in the retrieval
evaluation corpus). Training files use training towns only; evaluation files use
held-out (and distractor) towns only.

Output (all UTF-8 JSON Lines, one object per line, ``ensure_ascii=False``)::

    pretrain/weak_{en,zh}.jsonl          {"query": title, "pos": [passage]}
    finetune/retrieval_{en,zh}.jsonl     {"query": question, "pos": [passage]}
    finetune/sts_{en,zh}.jsonl           {"query": sentence, "pos": [paraphrase]}
    finetune/cls_{en,zh}.jsonl           {"text": passage or question, "label": its attribute's label}
    eval/DemoRetrieval{En,Zh}/corpus.jsonl   {"id", "text"}
    eval/DemoRetrieval{En,Zh}/queries.jsonl  {"id", "text"}
    eval/DemoRetrieval{En,Zh}/qrels.tsv      query-id<TAB>corpus-id<TAB>score (header line)
    eval/DemoSTS{En,Zh}/test.jsonl           {"sentence1", "sentence2", "score"}
    README.md

STS grades (test.jsonl), 70 pairs each: 5 = the same fact paraphrased (two different
templates); 3 = same town and attribute, different value; 2 = same town, different
attribute (same topic, different facts); 1 = different town, same attribute; 0 =
different town and attribute. Grades 3 and 1 reuse the first sentence's template in 80%
of pairs, so they share most words with it without sharing its meaning: a model that
matches wording rates them too high. (Grades 2 and 1 are deliberately in this order, not
the reverse: two facts about the same town are more related than the same sentence frame
filled with another town and value, and with the reverse order fine-tuning on this
corpus, with in-batch or with mined hard negatives, did not raise the Spearman score of
all-MiniLM-L6-v2, while with this order it does.)

Planted problems (the pipeline's stages must catch them):

(a) Duplicates, in every pretrain file and every finetune retrieval and STS file:
    ``round(2% of the clean records)`` extra records that duplicate a clean record of the
    same file. About half of them (``n - n // 2``) are byte-identical copies; the rest
    (``n // 2``) differ only in whitespace (a doubled space, or a leading/trailing space) or
    in full-width versus half-width characters (e.g. ``Ｂｅｌｍｏｒａ``, ``１８２０``, ``,``
    for ``，``), so only NFKC + whitespace normalisation (collapse runs, strip) reveals them.
    Whitespace and width variants alternate, whitespace first. The change is in the query
    or the positive. The labelled cls files get none: the pipeline's labelled stage draws a
    positive for each text, so a copy of a text would become a record with another
    positive, which record dedup (query and positives) does not recognise.
(b) Evaluation leaks, in each finetune retrieval file only: 5 records built from
    held-out evaluation data: 2 whose query is a DemoRetrieval query text (with a fresh
    paraphrased positive), 2 whose positive is a DemoRetrieval corpus passage (with a
    fresh question), and 1 that copies both an evaluation query and its relevant
    corpus passage.

Apart from these planted records, every record (every text of a cls file) is unique under
NFKC + whitespace normalisation and no training text equals an evaluation text. The script
checks this.

The output is deterministic: a fixed seed, string-seeded ``random.Random`` instances
(independent of PYTHONHASHSEED), fixed key order, ``\\n`` line endings. Re-running it
reproduces the files byte for byte; ``--check`` verifies that without writing.

Usage::

    python scripts/make_demo_corpus.py [--out data/demo] [--seed 20240611] [--check]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import unicodedata
from pathlib import Path

DEFAULT_SEED = 20240611
N_TRAIN, N_EVAL, N_DISTRACT = 120, 40, 10
DUP_RATE = 0.02
P_CONTEXT = 0.5  # share of retrieval-style passages that get a generic context sentence
P_SAME_TEMPLATE = 0.8  # STS grades 3 and 1: share of pairs worded with the same template
REPO = Path(__file__).resolve().parent.parent

ATTRS = ["founding", "population", "economy", "climate", "landmark", "river", "dish", "festival", "elevation", "native"]

# --------------------------------------------------------------------------------------
# English world
# --------------------------------------------------------------------------------------
EN = {
    "onsets": [
        "Bel",
        "Cor",
        "Dun",
        "Ash",
        "Mar",
        "Wen",
        "Hal",
        "Tor",
        "Eld",
        "Fen",
        "Gar",
        "Kes",
        "Lor",
        "Ost",
        "Pen",
        "Ros",
        "Sil",
        "Tam",
        "Val",
        "Wyn",
        "Bra",
        "Cal",
        "Dor",
        "Ev",
        "Far",
        "Gil",
        "Har",
        "Isel",
        "Jun",
        "Kel",
        "Lan",
        "Mor",
        "Nor",
        "Orr",
        "Pel",
        "Quen",
        "Rav",
        "Sto",
        "Thal",
        "Ul",
        "Ver",
        "Wil",
        "Yar",
        "Zel",
    ],
    "mids": ["", "", "a", "e", "i", "o", "an", "en", "ar", "or", "el", "in"],
    "codas": [
        "mora",
        "ford",
        "wick",
        "dale",
        "holm",
        "stead",
        "by",
        "ton",
        "mere",
        "gate",
        "crest",
        "haven",
        "bury",
        "thorpe",
        "moor",
        "field",
        "ridge",
        "wood",
        "vale",
        "more",
        "ley",
        "ham",
        "stow",
        "combe",
        "ness",
    ],
    "values": {
        "industry": [
            "shipbuilding",
            "textile weaving",
            "tea growing",
            "porcelain making",
            "copper mining",
            "fishing",
            "wine making",
            "timber and sawmills",
            "papermaking",
            "silk production",
            "glassblowing",
            "clockmaking",
            "beekeeping",
            "salt harvesting",
            "apple orchards",
            "sheep farming",
            "printing and publishing",
            "iron casting",
            "cheese making",
            "leather tanning",
        ],
        "climate": [
            "mild, rainy winters and cool summers",
            "hot, dry summers and short, mild winters",
            "long, snowy winters and brief summers",
            "humid heat and heavy summer rain",
            "thick sea fog and steady coastal winds",
            "dry, dusty winds and very little rain",
            "warm, sunny weather for most of the year",
            "large swings between hot days and cold nights",
            "frequent thunderstorms in late summer",
            "cold, clear winters and pleasant springs",
            "damp, grey weather for much of the year",
            "frosty mornings even in late spring",
            "a short rainy season followed by months of drought",
            "gentle breezes and moderate temperatures",
        ],
        "landmark": [
            "the old stone bell tower",
            "a covered wooden bridge",
            "the cliffside lighthouse",
            "a ruined hilltop castle",
            "the glass-domed market hall",
            "a seven-arched aqueduct",
            "the great clock on the town hall",
            "a thousand-year-old ginkgo tree",
            "the white pagoda",
            "a windmill on the harbour wall",
            "the painted city gate",
            "the twin towers of the cathedral",
            "a marble fountain in the main square",
            "the old observatory",
            "a botanical garden with a palm house",
            "a terraced vineyard above the old quarter",
            "the copper-roofed opera house",
            "a stone labyrinth",
            "the long wooden pier",
            "a riverside theatre built in timber",
        ],
        "river": [
            "Oster",
            "Vail",
            "Maren",
            "Tessel",
            "Drune",
            "Aldra",
            "Corrin",
            "Isca",
            "Wendle",
            "Sable",
            "Orme",
            "Tavy",
            "Quill",
            "Hollin",
            "Sorrel",
            "Fennick",
            "Morrow",
            "Glenna",
            "Rillan",
            "Amberlo",
        ],
        "dish": [
            "smoked eel with rye bread",
            "lamb and barley stew",
            "honey almond cakes",
            "fried river trout",
            "mushroom dumplings",
            "spiced pumpkin soup",
            "pickled herring",
            "roast duck with plums",
            "chestnut bread",
            "cabbage rolls with rice",
            "fish baked in salt",
            "walnut pastries",
            "beef and onion pie",
            "sweet corn fritters",
            "goat cheese pancakes",
            "peppered sausages",
            "crayfish in butter",
            "berry pudding",
            "sour cherry soup",
            "buckwheat noodles",
        ],
        "festival": [
            "a lantern festival in late autumn",
            "a summer boat race",
            "a spring flower fair",
            "a midwinter bonfire night",
            "a harvest parade",
            "a kite-flying contest",
            "a week-long music fair",
            "a cheese and wine market",
            "a torchlight procession",
            "an autumn horse fair",
            "a midsummer dance on the riverbank",
            "a snow sculpture contest",
            "a night market under the stars",
            "a masked carnival",
            "a pumpkin-carving show",
            "a poetry contest",
        ],
        "person": [
            "painter Ilse Varn",
            "poet Tomas Hale",
            "composer Mira Oakes",
            "explorer Juno Brandt",
            "astronomer Edda Keel",
            "novelist Piet Lammer",
            "architect Lina Sorb",
            "singer Oskar Rune",
            "inventor Felix Dahl",
            "mathematician Nora Quist",
            "sculptor Anton Wey",
            "chess champion Runa Telk",
            "actress Greta Moll",
            "botanist Hugo Farr",
            "mapmaker Ada Penrick",
            "violinist Emil Strand",
        ],
    },
    "passages": {
        "founding": [
            "{name} was founded in {year}.",
            "The first houses of {name} were built in {year}.",
            "Records show that {name} received its town charter in {year}.",
            "{name} dates back to {year}, when a small trading post was set up there.",
            "Settlers established {name} in the year {year}.",
        ],
        "population": [
            "About {pop} people live in {name}.",
            "{name} is home to roughly {pop} residents.",
            "The latest census counted {pop} inhabitants in {name}.",
            "{name} has a population of around {pop}.",
            "Some {pop} people have their homes in {name} today.",
        ],
        "economy": [
            "The economy of {name} rests mainly on {industry}.",
            "Most jobs in {name} are in {industry}.",
            "{name} is known above all for its {industry}, which employs much of the town.",
            "{Industry} is the main source of income in {name}.",
            "Half of the families in {name} make their money from {industry}.",
        ],
        "climate": [
            "{name} has {climate}.",
            "The weather in {name} is marked by {climate}.",
            "Visitors to {name} should expect {climate}.",
            "Locals say that {name} is a place of {climate}.",
        ],
        "landmark": [
            "The best-known landmark of {name} is {landmark}.",
            "Most tourists in {name} come to see {landmark}.",
            "{Landmark} is the symbol of {name}.",
            "Postcards from {name} usually show {landmark}.",
        ],
        "river": [
            "{name} lies on the banks of the {river} River.",
            "The {river} River flows through the centre of {name}.",
            "{name} grew up where the {river} River bends to the south.",
            "Boats on the {river} River once brought goods to {name}.",
        ],
        "dish": [
            "The signature dish of {name} is {dish}.",
            "No meal in {name} is complete without {dish}.",
            "Every restaurant in {name} serves {dish}.",
            "Locals in {name} are proud of their {dish}.",
        ],
        "festival": [
            "Every year {name} holds {festival}.",
            "The biggest event in {name} is {festival}.",
            "{name} is busiest during {festival}, which draws crowds from the whole region.",
            "Each year, locals and guests gather in {name} for {festival}.",
        ],
        "elevation": [
            "{name} lies {alt} metres above sea level.",
            "The centre of {name} stands at an altitude of {alt} metres.",
            "{name} is built at a height of {alt} metres.",
            "Maps give the elevation of {name} as {alt} metres.",
        ],
        "native": [
            "The {person} was born in {name}.",
            "The most famous child of {name} is the {person}.",
            "{name} is the birthplace of the {person}.",
            "{name} is proud to be the hometown of the {person}.",
        ],
    },
    "queries": {
        "founding": [
            "How old is {name}?",
            "When did {name} come into being?",
            "In what year did the story of {name} begin?",
            "Since when has {name} existed?",
            "How far back does the history of {name} go?",
        ],
        "population": [
            "How many people call {name} home?",
            "How big is the community of {name}?",
            "What is the headcount of {name}?",
            "How crowded is {name}?",
            "Is {name} a big place or a small one?",
        ],
        "economy": [
            "How do people in {name} earn a living?",
            "What kind of work do most people in {name} do?",
            "What keeps {name} prosperous?",
            "Which trade supports {name}?",
            "Where does the money in {name} come from?",
        ],
        "climate": [
            "What clothes should I pack for a trip to {name}?",
            "Is it usually warm or cold in {name}?",
            "What are the seasons like in {name}?",
            "Do I need an umbrella in {name}?",
            "What is it like outdoors in {name} through the year?",
        ],
        "landmark": [
            "What sight should I not miss in {name}?",
            "What do visitors photograph in {name}?",
            "What is the most famous attraction of {name}?",
            "Where do sightseers go in {name}?",
            "What should a first-time visitor go and look at in {name}?",
        ],
        "river": [
            "Which waterway passes through {name}?",
            "What water runs past {name}?",
            "{name} sits beside which stream?",
            "What is the name of the watercourse at {name}?",
            "Which body of flowing water is {name} built on?",
        ],
        "dish": [
            "What should I eat when visiting {name}?",
            "What food is typical of {name}?",
            "Which local speciality should I order in {name}?",
            "What do people in {name} like to cook?",
            "What is on the dinner table in {name}?",
        ],
        "festival": [
            "When is the best time to join the celebrations in {name}?",
            "What annual celebration takes place in {name}?",
            "How does {name} celebrate?",
            "Is there a yearly party in {name}?",
            "What gathering is {name} famous for?",
        ],
        "elevation": [
            "How high up is {name}?",
            "Is {name} in the mountains or down in the lowlands?",
            "How far would I have to climb from the coast to reach {name}?",
            "How thin is the air in {name}?",
            "How far above the sea is {name}?",
        ],
        "native": [
            "Who is the most celebrated person to come from {name}?",
            "Which well-known figure grew up in {name}?",
            "Whose home town is {name}?",
            "What famous name is linked to {name}?",
            "Who put {name} on the map?",
        ],
    },
    # Generic second sentences (never answering an attribute question), attached to half of
    # the passages: they make passages of one town more alike and set lexical traps.
    "context": [
        "Most people there know each other by name.",
        "Visitors often stay for a week or more.",
        "It is a quiet place far from the capital.",
        "Its streets are lively on market days.",
        "Many of its houses have red-tiled roofs.",
        "Travellers reach it by a single winding road.",
        "The old quarter still has cobbled lanes.",
        "Families there have lived in the same houses for generations.",
        "It is a pleasant stop for people crossing the province.",
        "Young people often leave for the big cities.",
        "The town looks its best in the evening light.",
        "Guidebooks describe it as charming but little known.",
        "Its square fills with people every Sunday.",
        "Few towns in the province are so well kept.",
        "It is often mentioned in old travel diaries.",
        "The local council meets in a modest brick building.",
    ],
    "titles": ["{name} — {topic}", "{name}: {topic}", "{Topic} of {name}"],
    "topics": {
        "founding": "founding",
        "population": "population",
        "economy": "economy",
        "climate": "climate",
        "landmark": "landmarks",
        "river": "river",
        "dish": "cuisine",
        "festival": "festivals",
        "elevation": "elevation",
        "native": "famous people",
    },
    "labels": {
        "founding": "history and founding",
        "population": "population and size",
        "economy": "economy and industry",
        "climate": "climate and weather",
        "landmark": "landmarks and sights",
        "river": "rivers and waterways",
        "dish": "food and cuisine",
        "festival": "festivals and events",
        "elevation": "altitude and terrain",
        "native": "famous people",
    },
}

# --------------------------------------------------------------------------------------
# Chinese world (written natively)
# --------------------------------------------------------------------------------------
ZH = {
    "first": list("青石安宁河云白金临平永清长丰兴嘉桐松柳梅凤龙玉明远泉溪湖山阳春秋霞枫竹兰桂鹤鹿雁"),
    "second": list("石安宁河云川林峰塘桥泽原岭口坪湾门水谷港堡庄陵渡滨屯关坡洲源"),
    "suffixes": list("城镇州"),
    # Well-known real place names are skipped so that the world stays fictional.
    "avoid": {
        "长安",
        "安阳",
        "平阳",
        "清远",
        "永州",
        "长沙",
        "云南",
        "河源",
        "兴宁",
        "宁波",
        "金门",
        "丰城",
        "明水",
        "龙门",
        "玉林",
        "松原",
        "桂林",
        "春城",
        "白城",
        "梅州",
        "金州",
        "泉州",
        "龙口",
        "青岛",
        "石门",
        "河口",
        "清河",
        "安庆",
        "阳泉",
        "嘉兴",
        "凤阳",
        "临安",
        "长春",
        "阳江",
        "兰州",
        "青州",
        "湖州",
        "柳州",
        "松江",
        "云浮",
        "玉溪",
        "临沂",
        "白山",
        "鹤岗",
        "长岭",
        "永安",
        "平原",
        "明港",
        "金堡",
        "兴城",
        "凤城",
        "龙泉",
        "丰原",
        "桐庐",
        "松山",
        "龙岩",
        "安源",
        "临河",
        "清水",
        "长兴",
        "平谷",
        "石林",
        "兴安",
        "安宁",
        "永宁",
        "泉港",
    },
    "values": {
        "industry": [
            "造船业",
            "纺织业",
            "种茶制茶",
            "烧制瓷器",
            "开采铜矿",
            "打鱼",
            "酿酒",
            "木材加工",
            "造纸",
            "缫丝织绸",
            "吹制玻璃",
            "制作钟表",
            "养蜂",
            "晒盐",
            "种植果园",
            "养羊",
            "印刷出版",
            "铸铁",
            "制作奶酪",
            "鞣制皮革",
        ],
        "climate": [
            "冬季温和多雨，夏季凉爽",
            "夏季炎热干燥，冬季短暂",
            "冬季漫长，大雪纷飞",
            "全年湿热，雨水充沛",
            "常年多雾，海风不断",
            "干旱少雨，风沙较大",
            "四季如春，阳光充足",
            "昼夜温差很大，早晚寒凉",
            "夏末雷雨频繁",
            "冬季寒冷晴朗，春天温暖宜人",
            "终年阴湿，难得见到晴天",
            "到了晚春仍有霜冻",
            "雨季短促，随后是几个月的旱季",
            "微风和煦，气温适中",
        ],
        "landmark": [
            "古老的石砌钟楼",
            "一座木制廊桥",
            "悬崖上的灯塔",
            "山顶的古堡遗址",
            "玻璃穹顶的集市大厅",
            "七孔石拱桥",
            "市政厅楼顶的大钟",
            "一棵千年银杏",
            "白塔寺",
            "港口堤岸上的风车",
            "彩绘城门",
            "双塔大教堂",
            "广场中央的大理石喷泉",
            "老天文台",
            "带温室的植物园",
            "山坡上的梯田葡萄园",
            "铜顶歌剧院",
            "石砌迷宫",
            "伸进水里的长木栈桥",
            "临河的百年戏台",
        ],
        "river": [
            "白沙江",
            "青龙河",
            "玉带河",
            "柳叶溪",
            "金鳞江",
            "乌石河",
            "碧波江",
            "黄泥河",
            "双溪",
            "月牙河",
            "雁鸣江",
            "桃花溪",
            "铁索河",
            "古渡江",
            "长虹河",
            "银滩河",
            "芦花江",
            "松涛河",
            "落霞江",
            "石门溪",
        ],
        "dish": [
            "烟熏鳗鱼配黑麦面包",
            "羊肉大麦汤",
            "蜂蜜杏仁糕",
            "香煎河鳟",
            "蘑菇饺子",
            "五香南瓜汤",
            "酸菜炖鱼",
            "桂花糯米藕",
            "栗子面包",
            "葱油饼",
            "盐焗鱼",
            "核桃酥",
            "牛肉洋葱馅饼",
            "玉米甜饼",
            "羊奶酪煎饼",
            "胡椒腊肠",
            "黄油焗小龙虾",
            "红烧肉",
            "酸樱桃汤",
            "荞麦面",
        ],
        "festival": [
            "深秋的灯会",
            "夏天的龙舟赛",
            "春季花市",
            "冬至篝火夜",
            "秋收游行",
            "放风筝比赛",
            "为期一周的音乐集市",
            "奶酪美酒市集",
            "火把游行",
            "秋季赛马会",
            "仲夏河畔舞会",
            "雪雕大赛",
            "星空夜市",
            "假面狂欢节",
            "南瓜雕刻展",
            "赛诗会",
        ],
        "person": [
            "画家林素",
            "诗人周远山",
            "作曲家沈默",
            "探险家陆青",
            "天文学家梁星河",
            "小说家何晚",
            "建筑师许一川",
            "歌唱家唐铃",
            "发明家顾长风",
            "数学家白若",
            "书法家程墨",
            "棋手秦简",
            "演员苏蔓",
            "植物学家方草",
            "地图绘制师韩量",
            "小提琴家叶弦",
        ],
    },
    "passages": {
        "founding": [
            "{name}始建于{year}年。",
            "{name}的第一批房屋建于{year}年。",
            "据史料记载，{name}于{year}年正式建制。",
            "{name}的历史可以追溯到{year}年，当时这里只是一个小小的集市。",
            "{year}年，第一批移民在此落脚，{name}由此诞生。",
        ],
        "population": [
            "{name}约有{pop}人。",
            "{name}常住人口约{pop}人。",
            "最新一次人口普查显示，{name}共有居民{pop}人。",
            "{name}生活着大约{pop}名居民。",
            "如今有{pop}左右的人在{name}安家。",
        ],
        "economy": [
            "{name}的经济主要依靠{industry}。",
            "{name}大多数人都以{industry}为业。",
            "{industry}是{name}最主要的收入来源。",
            "一提起{name}，人们首先想到的就是当地的{industry}。",
            "{name}有一半人家靠{industry}过日子。",
        ],
        "climate": [
            "{name}{climate}。",
            "{name}的天气特点是{climate}。",
            "到{name}旅行要有准备：这里{climate}。",
            "当地人常说，{name}{climate}。",
        ],
        "landmark": [
            "{name}最著名的地标是{landmark}。",
            "来{name}的游客大多是冲着{landmark}去的。",
            "{landmark}是{name}的象征。",
            "{name}的明信片上，印的多半是{landmark}。",
        ],
        "river": [
            "{name}坐落在{river}岸边。",
            "{river}从{name}中间穿流而过。",
            "{name}依{river}而建。",
            "过去，{river}上的货船把各地的货物运到{name}。",
        ],
        "dish": [
            "{name}的招牌菜是{dish}。",
            "在{name}，一顿饭少不了{dish}。",
            "{name}的每家饭馆都会做{dish}。",
            "{name}人最拿得出手的一道菜是{dish}。",
        ],
        "festival": [
            "{name}每年都会举办{festival}。",
            "{name}一年当中最热闹的时候是{festival}。",
            "{festival}每年都吸引四面八方的游客来到{name}。",
            "每到{festival}，{name}便家家户户出门相聚。",
        ],
        "elevation": [
            "{name}海拔约{alt}米。",
            "{name}位于海拔{alt}米的地方。",
            "{name}城区的平均海拔为{alt}米。",
            "地图上标注的{name}海拔高度是{alt}米。",
        ],
        "native": [
            "{person}出生在{name}。",
            "{name}最有名的人物是{person}。",
            "{name}是{person}的故乡。",
            "{name}人常以{person}为荣。",
        ],
    },
    "queries": {
        "founding": [
            "{name}有多少年历史了？",
            "{name}是什么时候出现的？",
            "{name}有多古老？",
            "{name}从哪一年开始有人住？",
            "{name}最早是哪一年形成的？",
        ],
        "population": [
            "{name}住着多少人？",
            "{name}人多不多？",
            "{name}的居民数量有多少？",
            "{name}是个大地方还是小地方？",
            "{name}一共有多少口人？",
        ],
        "economy": [
            "{name}的人靠什么谋生？",
            "{name}的居民大多做什么工作？",
            "{name}靠什么富起来？",
            "{name}的钱主要从哪里来？",
            "在{name}，年轻人一般干哪一行？",
        ],
        "climate": [
            "去{name}旅游要带什么衣服？",
            "{name}一年到头冷不冷？",
            "{name}的四季是什么样子？",
            "去{name}需要带伞吗？",
            "{name}出门穿什么合适？",
        ],
        "landmark": [
            "到了{name}有什么非看不可的？",
            "在{name}最值得拍照的是哪里？",
            "{name}最出名的景观是什么？",
            "游客到{name}都去哪里参观？",
            "{name}有什么好逛的地方？",
        ],
        "river": [
            "流经{name}的是哪条水？",
            "{name}旁边是哪条水道？",
            "{name}靠着哪条江河？",
            "在{name}坐船走的是哪条水路？",
            "{name}的人在哪条水里打鱼洗衣？",
        ],
        "dish": [
            "去{name}该尝尝什么？",
            "{name}有什么特色吃食？",
            "{name}当地人爱吃什么？",
            "在{name}点什么菜最地道？",
            "{name}的餐桌上常见什么？",
        ],
        "festival": [
            "{name}有什么传统庆祝活动？",
            "什么时候去{name}能赶上热闹？",
            "{name}的人怎么过节？",
            "{name}有哪些一年一度的盛事？",
            "{name}有什么值得专程去参加的活动？",
        ],
        "elevation": [
            "{name}地势有多高？",
            "{name}是在山上还是在平原上？",
            "从海边到{name}要爬多高？",
            "去{name}会不会有高原反应？",
            "{name}比海面高出多少？",
        ],
        "native": [
            "{name}出过什么名人？",
            "哪位知名人物是在{name}长大的？",
            "{name}最让人骄傲的同乡是谁？",
            "谁让{name}出了名？",
            "提到{name}，人们会想起哪位大人物？",
        ],
    },
    "context": [
        "这里的人彼此都叫得出名字。",
        "不少游客一住就是一个星期。",
        "这是一个远离都市的安静地方。",
        "每逢集日，街上格外热闹。",
        "许多房子都盖着红瓦。",
        "进出只有一条蜿蜒的山路。",
        "老城区至今保留着石板小巷。",
        "很多人家祖祖辈辈住在同一座老宅里。",
        "来往本省的旅人常在这里歇脚。",
        "年轻人大多去大城市闯荡。",
        "傍晚时分，这里的景色最美。",
        "旅游指南说这里小巧迷人，却鲜为人知。",
        "每到周日，广场上便挤满了人。",
        "全省很少有地方收拾得这样整洁。",
        "旧时的游记里常常提到这里。",
        "议事厅设在一栋朴素的砖楼里。",
    ],
    "titles": ["{name} · {topic}", "{name}：{topic}", "{name}的{topic}"],
    "topics": {
        "founding": "建城",
        "population": "人口",
        "economy": "经济",
        "climate": "气候",
        "landmark": "地标",
        "river": "河流",
        "dish": "美食",
        "festival": "节庆",
        "elevation": "海拔",
        "native": "名人",
    },
    "labels": {
        "founding": "历史与建城",
        "population": "人口与规模",
        "economy": "经济与产业",
        "climate": "气候与天气",
        "landmark": "名胜与地标",
        "river": "河流与水系",
        "dish": "饮食与美食",
        "festival": "节庆与活动",
        "elevation": "地势与海拔",
        "native": "人物与名人",
    },
}

WORLDS = {"en": EN, "zh": ZH}
VALUE_KEY = {
    "economy": "industry",
    "climate": "climate",
    "landmark": "landmark",
    "river": "river",
    "dish": "dish",
    "festival": "festival",
    "native": "person",
}
VALUE_FIELDS = ("industry", "climate", "landmark", "river", "dish", "festival", "person")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def rng_for(seed: int, *parts: str) -> random.Random:
    """An independent RNG per component; str seeds are hashed with SHA-512 (stable)."""
    return random.Random(f"{seed}:" + ":".join(parts))


def normalise(text: str) -> str:
    """NFKC + whitespace collapse + strip: the key under which planted near-duplicates collide."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_names(lang: str, n: int, rng: random.Random) -> list[str]:
    w = WORLDS[lang]
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        if lang == "en":
            name = cap(rng.choice(w["onsets"]) + rng.choice(w["mids"]) + rng.choice(w["codas"]))
            key = name.lower()
            if len(name) < 6 or len(name) > 11:
                continue
        else:
            a, b = rng.choice(w["first"]), rng.choice(w["second"])
            key = a + b
            if a == b or key in w["avoid"]:
                continue
            name = key + rng.choice(w["suffixes"])
        if key in seen:
            continue
        seen.add(key)
        names.append(name)
    return names


def make_entity(lang: str, name: str, rng: random.Random) -> dict:
    vals = WORLDS[lang]["values"]
    ent = {"name": name, "year": rng.randint(1050, 1950)}
    pop = math.exp(rng.uniform(math.log(900), math.log(450_000)))
    ent["pop"] = int(round(pop, -2 if pop < 100_000 else -3))
    ent["alt"] = random_alt(rng)
    for key in VALUE_FIELDS:
        ent[key] = rng.choice(vals[key])
    return ent


def random_alt(rng: random.Random) -> int:
    alt = math.exp(rng.uniform(math.log(4), math.log(2400)))
    return max(2, int(round(alt, 0 if alt < 20 else (-1 if alt < 1000 else -2))))


def other_value(lang: str, ent: dict, attr: str, rng: random.Random) -> dict:
    """A copy of ``ent`` with a different value for ``attr`` (for STS grade 3)."""
    new = dict(ent)
    if attr == "founding":
        while abs(new["year"] - ent["year"]) < 40:
            new["year"] = rng.randint(1050, 1950)
    elif attr == "population":
        while not (ent["pop"] / 4 > new["pop"] or new["pop"] > ent["pop"] * 4):
            pop = math.exp(rng.uniform(math.log(900), math.log(450_000)))
            new["pop"] = int(round(pop, -2 if pop < 100_000 else -3))
    elif attr == "elevation":
        while not (ent["alt"] / 3 > new["alt"] or new["alt"] > ent["alt"] * 3):
            new["alt"] = random_alt(rng)
    else:
        key = VALUE_KEY[attr]
        new[key] = rng.choice([v for v in WORLDS[lang]["values"][key] if v != ent[key]])
    return new


def fmt_pop(lang: str, pop: int) -> str:
    if lang == "en":
        return f"{pop:,}"
    if pop >= 10_000:
        return f"{pop / 10_000:.1f}".rstrip("0").rstrip(".") + "万"
    return str(pop)


def fill(lang: str, template: str, ent: dict) -> str:
    slots = {
        "name": ent["name"],
        "year": ent["year"],
        "pop": fmt_pop(lang, ent["pop"]),
        "alt": f"{ent['alt']:,}" if lang == "en" else str(ent["alt"]),
    }
    for key in VALUE_FIELDS:
        slots[key] = ent[key]
        slots[cap(key)] = cap(ent[key])
    return template.format(**slots)


def passage(lang: str, ent: dict, attr: str, t: int, ctx: int | None = None) -> str:
    """Passage template ``t`` for a fact, optionally followed by generic context sentence ``ctx``."""
    text = fill(lang, WORLDS[lang]["passages"][attr][t], ent)
    if ctx is not None:
        text += (" " if lang == "en" else "") + WORLDS[lang]["context"][ctx]
    return text


def rand_passage(lang: str, ent: dict, attr: str, r: random.Random, exclude: int | None = None) -> str:
    """A passage with a random template (not ``exclude``) and, half of the time, a context sentence."""
    t = r.choice([t for t in range(n_passage_templates(lang, attr)) if t != exclude])
    ctx = r.randrange(len(WORLDS[lang]["context"])) if r.random() < P_CONTEXT else None
    return passage(lang, ent, attr, t, ctx)


def query(lang: str, ent: dict, attr: str, t: int) -> str:
    return fill(lang, WORLDS[lang]["queries"][attr][t], ent)


def n_passage_templates(lang: str, attr: str) -> int:
    return len(WORLDS[lang]["passages"][attr])


def n_query_templates(lang: str, attr: str) -> int:
    return len(WORLDS[lang]["queries"][attr])


# --------------------------------------------------------------------------------------
# Planted near-duplicates
# --------------------------------------------------------------------------------------
def _to_fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


def whitespace_variant(text: str, rng: random.Random) -> str:
    spaces = [i for i, c in enumerate(text) if c == " "]
    if spaces:
        i = rng.choice(spaces)
        return text[:i] + "  " + text[i + 1 :]
    return rng.choice([" " + text, text + " ", " " + text + " "])


def width_variant(text: str, rng: random.Random) -> str | None:
    """Change full-width/half-width forms so that only NFKC reveals the duplicate."""
    words = [m.span() for m in re.finditer(r"[A-Za-z0-9]+", text)]
    if words:
        a, b = rng.choice(words)
        return text[:a] + _to_fullwidth(text[a:b]) + text[b:]
    fw = [i for i, c in enumerate(text) if 0xFF01 <= ord(c) <= 0xFF5E]
    if fw:  # e.g. "，" -> ",", "？" -> "?", "：" -> ":"
        i = rng.choice(fw)
        return text[:i] + unicodedata.normalize("NFKC", text[i]) + text[i + 1 :]
    return None


def near_duplicate(rec: dict, kind: str, rng: random.Random) -> dict:
    fields = ["query", "pos"]
    rng.shuffle(fields)
    for field in fields:
        text = rec[field] if field == "query" else rec["pos"][0]
        new = whitespace_variant(text, rng) if kind == "whitespace" else width_variant(text, rng)
        if new is None or new == text:
            continue
        assert normalise(new) == normalise(text)
        out = {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}
        if field == "query":
            out["query"] = new
        else:
            out["pos"] = [new] + out["pos"][1:]
        return out
    raise ValueError(f"cannot make a {kind} variant of {rec!r}")


def record_key(rec: dict) -> tuple:
    return (normalise(rec["query"]),) + tuple(normalise(p) for p in rec["pos"])


def plant_duplicates(records: list[dict], rng: random.Random, protected: int = 0) -> tuple[list[dict], dict]:
    """Append ~2% duplicates of the first ``len(records) - protected`` records; shuffle."""
    clean = records[: len(records) - protected] if protected else records
    keys = [record_key(r) for r in records]
    assert len(set(keys)) == len(keys), "clean records must be unique after normalisation"
    n = round(DUP_RATE * len(clean))
    n_near = n // 2
    n_exact = n - n_near
    order = iter(rng.sample(range(len(clean)), len(clean)))  # each record duplicated at most once
    dups = []
    for j in range(n):
        kind = "exact" if j < n_exact else ("whitespace", "width")[(j - n_exact) % 2]
        while True:
            rec = clean[next(order)]
            if kind == "exact":
                dups.append(dict(rec))
                break
            try:
                dups.append(near_duplicate(rec, kind, rng))
                break
            except ValueError:  # e.g. a Chinese record without digits or full-width punctuation
                continue
    n_ws = sum(1 for j in range(n_exact, n) if (j - n_exact) % 2 == 0)
    out = records + dups
    rng.shuffle(out)
    stats = {"clean": len(clean), "exact": n_exact, "whitespace": n_ws, "width": n_near - n_ws, "duplicates": n}
    return out, stats


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------
def build_language(lang: str, seed: int) -> tuple[dict[str, bytes], dict]:
    w = WORLDS[lang]
    r = rng_for(seed, lang, "entities")
    names = make_names(lang, N_TRAIN + N_EVAL + N_DISTRACT, r)
    ents = [make_entity(lang, nm, r) for nm in names]
    train, held, distract = ents[:N_TRAIN], ents[N_TRAIN : N_TRAIN + N_EVAL], ents[N_TRAIN + N_EVAL :]
    facts_train = [(e, a) for e in train for a in ATTRS]
    files: dict[str, bytes] = {}
    info: dict = {"train_entities": len(train), "eval_entities": len(held), "distractor_entities": len(distract)}
    Lang = lang.capitalize()

    # ---- evaluation: retrieval --------------------------------------------------------
    r = rng_for(seed, lang, "eval-retrieval")
    corpus_items = []  # (text, fact or None)
    eval_passage_t: dict[tuple[str, str], int] = {}
    for e in held + distract:
        for a in ATTRS:
            t = r.randrange(n_passage_templates(lang, a))
            ctx = r.randrange(len(w["context"])) if r.random() < P_CONTEXT else None
            if e in held:
                eval_passage_t[(e["name"], a)] = (t, ctx)
            corpus_items.append((passage(lang, e, a, t, ctx), (e["name"], a)))
    r.shuffle(corpus_items)
    corpus = [{"id": f"{lang}-d{i:04d}", "text": txt} for i, (txt, _) in enumerate(corpus_items, 1)]
    doc_id = {fact: d["id"] for d, (_, fact) in zip(corpus, corpus_items)}
    query_items = []
    eval_query_t: dict[tuple[str, str], list[int]] = {}
    for e in held:
        for a in ATTRS:
            ts = r.sample(range(n_query_templates(lang, a)), 2 if r.random() < 0.3 else 1)
            eval_query_t[(e["name"], a)] = ts
            query_items += [(query(lang, e, a, t), (e["name"], a)) for t in ts]
    r.shuffle(query_items)
    queries = [{"id": f"{lang}-q{i:04d}", "text": txt} for i, (txt, _) in enumerate(query_items, 1)]
    qrels = [(q["id"], doc_id[fact]) for q, (_, fact) in zip(queries, query_items)]
    assert len({d["text"] for d in corpus}) == len(corpus)
    assert len({q["text"] for q in queries}) == len(queries)
    base = f"eval/DemoRetrieval{Lang}"
    files[f"{base}/corpus.jsonl"] = jsonl(corpus)
    files[f"{base}/queries.jsonl"] = jsonl(queries)
    files[f"{base}/qrels.tsv"] = ("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels)).encode(
        "utf-8"
    )
    info["eval_corpus"], info["eval_queries"], info["eval_qrels"] = len(corpus), len(queries), len(qrels)
    eval_texts = {normalise(d["text"]) for d in corpus} | {normalise(q["text"]) for q in queries}

    # ---- evaluation: STS --------------------------------------------------------------
    r = rng_for(seed, lang, "eval-sts")
    per_grade = 70
    pairs: list[dict] = []
    seen_pairs: set[tuple[str, str]] = set()

    def add(s1: str, s2: str, score: float) -> bool:
        key = tuple(sorted((s1, s2)))
        if s1 == s2 or key in seen_pairs:
            return False
        seen_pairs.add(key)
        if r.random() < 0.5:
            s1, s2 = s2, s1
        pairs.append({"sentence1": s1, "sentence2": s2, "score": score})
        return True

    def rand_t(a: str, exclude: int | None = None) -> int:
        return r.choice([t for t in range(n_passage_templates(lang, a)) if t != exclude])

    for grade in (5.0, 3.0, 2.0, 1.0, 0.0):
        made = 0
        while made < per_grade:
            e = r.choice(held)
            a = r.choice(ATTRS)
            t1 = rand_t(a)
            s1 = passage(lang, e, a, t1)
            if grade == 5.0:
                s2 = passage(lang, e, a, rand_t(a, t1))
            elif grade == 3.0:
                t2 = t1 if r.random() < P_SAME_TEMPLATE else rand_t(a)
                s2 = passage(lang, other_value(lang, e, a, r), a, t2)
            elif grade == 2.0:  # same town, another attribute
                a2 = r.choice([x for x in ATTRS if x != a])
                s2 = passage(lang, e, a2, rand_t(a2))
            elif grade == 1.0:  # another town, same attribute, usually the same wording
                e2 = r.choice([x for x in held if x is not e])
                t2 = t1 if r.random() < P_SAME_TEMPLATE else rand_t(a)
                s2 = passage(lang, e2, a, t2)
            else:
                e2 = r.choice([x for x in held if x is not e])
                a2 = r.choice([x for x in ATTRS if x != a])
                s2 = passage(lang, e2, a2, rand_t(a2))
            made += add(s1, s2, grade)
    r.shuffle(pairs)
    files[f"eval/DemoSTS{Lang}/test.jsonl"] = jsonl(pairs)
    info["eval_sts"] = len(pairs)
    info["eval_sts_grades"] = {str(g): sum(p["score"] == g for p in pairs) for g in (0.0, 1.0, 2.0, 3.0, 5.0)}
    eval_texts |= {normalise(p["sentence1"]) for p in pairs} | {normalise(p["sentence2"]) for p in pairs}

    def check_clean(records: list[dict], what: str) -> None:
        for rec in records:
            for text in [rec["query"], *rec["pos"]]:
                assert normalise(text) not in eval_texts, f"{what}: unplanted eval overlap: {text}"

    # ---- pretrain: weak title -> passage pairs ------------------------------------------
    r = rng_for(seed, lang, "weak")
    weak = []
    for e, a in r.sample(facts_train, 800):
        title = r.choice(w["titles"])
        topic = w["topics"][a]
        weak.append(
            {"query": title.format(name=e["name"], topic=topic, Topic=cap(topic)), "pos": [rand_passage(lang, e, a, r)]}
        )
    check_clean(weak, "weak")
    weak, info["weak"] = plant_duplicates(weak, r)
    files[f"pretrain/weak_{lang}.jsonl"] = jsonl(weak)

    # ---- finetune: retrieval (one question per training fact) + planted leaks ----------
    r = rng_for(seed, lang, "retrieval")
    retr = []
    for e, a in facts_train:
        retr.append(
            {"query": query(lang, e, a, r.randrange(n_query_templates(lang, a))), "pos": [rand_passage(lang, e, a, r)]}
        )
    check_clean(retr, "retrieval")
    leak_facts = r.sample([(e, a) for e in held for a in ATTRS], 5)
    leaks = []
    for k, (e, a) in enumerate(leak_facts):
        qt = eval_query_t[(e["name"], a)]
        pt, pctx = eval_passage_t[(e["name"], a)]
        eval_q = query(lang, e, a, qt[0])
        eval_p = passage(lang, e, a, pt, pctx)
        fresh_q = query(lang, e, a, r.choice([t for t in range(n_query_templates(lang, a)) if t not in qt]))
        fresh_p = rand_passage(lang, e, a, r, exclude=pt)
        if k < 2:
            leaks.append({"query": eval_q, "pos": [fresh_p]})
        elif k < 4:
            leaks.append({"query": fresh_q, "pos": [eval_p]})
        else:
            leaks.append({"query": eval_q, "pos": [eval_p]})
    retr, info["retrieval"] = plant_duplicates(retr + leaks, r, protected=len(leaks))
    info["retrieval"]["leaks"] = {"eval_query": 2, "eval_passage": 2, "eval_query_and_passage": 1}
    files[f"finetune/retrieval_{lang}.jsonl"] = jsonl(retr)

    # ---- finetune: STS-like paraphrase pairs --------------------------------------------
    r = rng_for(seed, lang, "sts")
    sts = []
    for e, a in r.sample(facts_train, 500):
        t1, t2 = r.sample(range(n_passage_templates(lang, a)), 2)
        sts.append({"query": passage(lang, e, a, t1), "pos": [passage(lang, e, a, t2)]})
    check_clean(sts, "sts")
    sts, info["sts"] = plant_duplicates(sts, r)
    files[f"finetune/sts_{lang}.jsonl"] = jsonl(sts)

    # ---- finetune: classification exemplars, labelled {text, label} ---------------------
    # The config's `format: labelled` turns them into KaLM records (kalm/data/labelled.py): another
    # text of the same attribute as the positive, texts of other attributes as negatives (KaLM-V2).
    r = rng_for(seed, lang, "cls")
    labels = w["labels"]
    cand = []
    for e, a in facts_train:
        cand.append((rand_passage(lang, e, a, r), a))
        cand.append((query(lang, e, a, r.randrange(n_query_templates(lang, a))), a))
    cls = [{"text": text, "label": labels[a]} for text, a in r.sample(cand, 400)]
    for rec in cls:
        assert normalise(rec["text"]) not in eval_texts, f"cls: unplanted eval overlap: {rec['text']}"
    assert len({normalise(rec["text"]) for rec in cls}) == len(cls), "cls texts must be unique after normalisation"
    info["cls"] = {"clean": len(cls), "exact": 0, "whitespace": 0, "width": 0, "duplicates": 0}
    info["cls_per_label"] = {labels[a]: sum(rec["label"] == labels[a] for rec in cls) for a in ATTRS}
    files[f"finetune/cls_{lang}.jsonl"] = jsonl(cls)
    return files, info


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records).encode("utf-8")


# --------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------
def readme(files: dict[str, bytes], info: dict, seed: int) -> str:
    def lines(path: str) -> int:
        n = files[path].count(b"\n")
        return n - 1 if path.endswith(".tsv") else n

    def dup_row(lang: str, key: str, path: str) -> str:
        s = info[lang][key]
        leaks = sum(s.get("leaks", {}).values())
        return (
            f"| `{path}` | {lines(path)} | {s['clean']} | {s['duplicates']} | {s['exact']} | "
            f"{s['whitespace']} | {s['width']} | {leaks} |"
        )

    rows = []
    for lang in ("en", "zh"):
        rows += [
            dup_row(lang, "weak", f"pretrain/weak_{lang}.jsonl"),
            dup_row(lang, "retrieval", f"finetune/retrieval_{lang}.jsonl"),
            dup_row(lang, "sts", f"finetune/sts_{lang}.jsonl"),
            dup_row(lang, "cls", f"finetune/cls_{lang}.jsonl"),
        ]
    ev = []
    for lang, Lang in (("en", "En"), ("zh", "Zh")):
        b = f"eval/DemoRetrieval{Lang}"
        ev.append(
            f"| `{b}/corpus.jsonl` | {lines(b + '/corpus.jsonl')} | passages of the {info[lang]['eval_entities']} held-out towns (one per town × attribute) + {info[lang]['distractor_entities']} distractor towns |"
        )
        ev.append(
            f"| `{b}/queries.jsonl` | {lines(b + '/queries.jsonl')} | one or two questions per held-out town × attribute |"
        )
        ev.append(
            f"| `{b}/qrels.tsv` | {lines(b + '/qrels.tsv')} (+ header) | `query-id`, `corpus-id`, `score` (always 1) |"
        )
        g = info[lang]["eval_sts_grades"]
        ev.append(
            f"| `eval/DemoSTS{Lang}/test.jsonl` | {lines(f'eval/DemoSTS{Lang}/test.jsonl')} | graded pairs; per grade 5/3/2/1/0: {g['5.0']}/{g['3.0']}/{g['2.0']}/{g['1.0']}/{g['0.0']} |"
        )
    total_dups = sum(info[l][k]["duplicates"] for l in ("en", "zh") for k in ("weak", "retrieval", "sts", "cls"))

    def cls_counts(lang: str) -> str:
        n = info[lang]["cls_per_label"].values()
        return f"{min(n)}–{max(n)}"

    return f"""# Demo corpus (English + Chinese)

A small, synthetic, bilingual corpus for running and testing the pipeline end to end on
a CPU. **Generated** by `scripts/make_demo_corpus.py` (seed {seed}); do not edit by hand,
re-run the script instead (`python scripts/make_demo_corpus.py`; `--check` verifies that
the files here are byte-identical to what the script produces).

Licence: all text was written by this project (templates filled with fictional names and
values); it contains no third-party data and is distributed under the project's licence.

## The world

Fictional towns, each with ten attributes: founding year, population, main industry,
climate, best-known landmark, river, signature dish, yearly festival, elevation, most
famous native. Each attribute has 4–5 passage templates and 5 question templates per
language; questions avoid the
passage wording where possible (`The economy of Belmora rests mainly on shipbuilding.` /
`How do people in Belmora earn a living?`; `青石镇的经济主要依靠造船业。` /
`青石镇的人靠什么谋生？`). Every passage names its town, so the other passages of the same
town are natural hard negatives. Half of the passages (not the STS sentences) carry a
generic second sentence (`Most people there know each other by name.` /
`这里的人彼此都叫得出名字。`) that answers no question but makes one town's passages more
alike. Chinese templates are written natively.

Per language: {info["en"]["train_entities"]} training towns, {info["en"]["eval_entities"]} held-out evaluation towns, {info["en"]["distractor_entities"]} distractor towns
(all disjoint; English and Chinese towns are separate sets). Training files use
training towns only; evaluation files use held-out and distractor towns only.

## Training files

All JSON Lines, UTF-8, one object per line.

- `pretrain/weak_{{en,zh}}.jsonl` — weak pairs for pretraining: `{{"query": title, "pos": [passage]}}`,
  e.g. `Belmora — economy` / `青石镇 · 经济`.
- `finetune/retrieval_{{en,zh}}.jsonl` — `{{"query": question, "pos": [answering passage]}}`, one per
  training town × attribute; no `neg` (negatives are mined by the pipeline).
- `finetune/sts_{{en,zh}}.jsonl` — `{{"query": sentence, "pos": [paraphrase of the same fact]}}`.
- `finetune/cls_{{en,zh}}.jsonl` — labelled records `{{"text": passage or question, "label":
  attribute label}}`, 400 per language drawn from the training facts: ten classes (labels e.g.
  `economy and industry` / `经济与产业`), {cls_counts("en")} texts per class in English, {cls_counts("zh")} in
  Chinese. The config declares them `format: labelled`: the pipeline's labelled stage pairs each
  text with another text of its class as the positive and texts of other classes as negatives
  (KaLM-Embedding-V2's classification data), not with label texts.

| file | lines | clean records | planted duplicates | exact copies | whitespace variants | full-/half-width variants | planted eval leaks |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Planted problems

The pipeline's stages must catch these (lines = clean + duplicates + leaks).

**(a) Duplicates** ({total_dups} in all): in every pretrain file and every finetune retrieval
and STS file, `round(2% × clean records)` extra records duplicate a clean record of the same
file. Half of them (rounded up) are byte-identical copies; the others differ only in whitespace
(a doubled space, or a leading/trailing space) or in full-width vs half-width characters
(`Ｂｅｌｍｏｒａ`, `１８２０`, `,` for `，`, `?` for `？`), so only NFKC + whitespace normalisation
(collapse runs of whitespace, strip) reveals them. The change is in the query or the positive.
Records are shuffled, so duplicates are not adjacent. The labelled `cls_*` files have none: the
labelled stage draws a positive for each text, so a copy of a text would become a record with
another positive, which record dedup (query and positives) does not recognise.

**(b) Evaluation leaks** (5 per language): each `finetune/retrieval_*.jsonl` contains 5
records built from the held-out evaluation data: 2 whose query equals a
`DemoRetrieval*/queries.jsonl` text (with a freshly worded positive), 2 whose positive
equals a `DemoRetrieval*/corpus.jsonl` passage (with a freshly worded question), and 1
whose query and positive both equal an evaluation query and its relevant passage.

Apart from these, every record (every text of a `cls_*` file) is unique under NFKC + whitespace
normalisation, and no training text equals an evaluation text.

## Evaluation files

| file | lines | content |
|---|---|---|
{chr(10).join(ev)}

- Retrieval (`DemoRetrievalEn`, `DemoRetrievalZh`): `corpus.jsonl` and `queries.jsonl`
  hold `{{"id": str, "text": str}}`; `qrels.tsv` is tab-separated with a header line.
  Each query has exactly one relevant passage.
- STS (`DemoSTSEn`, `DemoSTSZh`): `{{"sentence1": str, "sentence2": str, "score": float}}`,
  graded 5 = the same fact paraphrased (different wording); 3 = same town and attribute,
  different value; 2 = same town, different attribute; 1 = different town, same
  attribute; 0 = different town and attribute. Grades 3 and 1 reuse the wording of
  sentence 1 in 80% of pairs (high word overlap, different meaning), so a model that
  matches words rather than meaning over-rates them.
"""


def build(seed: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    info = {}
    for lang in ("en", "zh"):
        f, info[lang] = build_language(lang, seed)
        files.update(f)
    files["README.md"] = readme(files, info, seed).encode("utf-8")
    return dict(sorted(files.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "demo", help="output directory")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 unless the files on disk are identical")
    args = ap.parse_args(argv)
    files = build(args.seed)
    if args.check:
        bad = [p for p, data in files.items() if not (args.out / p).is_file() or (args.out / p).read_bytes() != data]
        for p in bad:
            print(f"differs: {args.out / p}", file=sys.stderr)
        return 1 if bad else 0
    for rel, data in files.items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files, {total:,} bytes, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
