"""Deterministic generator of the bundled mixed Chinese/English demo corpus (``data/corpus/``).

The corpus is text the project writes itself: parallel Chinese/English sentence templates about
everyday topics (daily life, weather, food, travel, study, shopping, sport, technology, geography,
arithmetic, science and history facts) filled from small word lists with a seeded RNG. It is
meant for tiny demo models: repetitive enough that a few minutes of training lowers the loss
visibly, varied enough that the model has something to learn. It is not evaluation text.

Regenerate (byte-identical output for the same seed; a unit test checks the committed files)::

    python -m layerfreeze.data.corpus_gen            # writes layerfreeze/data/corpus/
    python -m layerfreeze.data.corpus_gen --out DIR  # somewhere else
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from layerfreeze.utils.io import atomic_write_text

SEED = 20240611
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
# file name -> number of documents
FILES = {"zh.txt": 760, "en.txt": 660, "mixed.jsonl": 380}

# Parallel (Chinese, English) word lists. English person names work at the start of a sentence
# after capitalising the first letter.
PEOPLE = [
    ("小明", "Xiao Ming"), ("李华", "Li Hua"), ("王老师", "Teacher Wang"), ("张医生", "Doctor Zhang"),
    ("我的朋友", "my friend"), ("她的哥哥", "her brother"), ("那位工程师", "the engineer"),
    ("一位农民", "a farmer"), ("陈阿姨", "Aunt Chen"), ("刘教授", "Professor Liu"),
    ("我的邻居", "my neighbour"), ("那个学生", "the student"), ("赵师傅", "Master Zhao"),
    ("周小姐", "Miss Zhou"), ("他的妹妹", "his younger sister"), ("一位作家", "a writer"),
]
CITIES = [
    ("北京", "Beijing", ("故宫", "the Forbidden City"), ("长城", "the Great Wall")),
    ("上海", "Shanghai", ("外滩", "the Bund"), ("豫园", "Yu Garden")),
    ("杭州", "Hangzhou", ("西湖", "West Lake"), ("灵隐寺", "Lingyin Temple")),
    ("西安", "Xi'an", ("兵马俑", "the Terracotta Army"), ("古城墙", "the ancient city wall")),
    ("成都", "Chengdu", ("熊猫基地", "the panda base"), ("宽窄巷子", "Kuanzhai Alley")),
    ("广州", "Guangzhou", ("广州塔", "Canton Tower"), ("珠江", "the Pearl River")),
    ("桂林", "Guilin", ("漓江", "the Li River"), ("象鼻山", "Elephant Trunk Hill")),
    ("伦敦", "London", ("大英博物馆", "the British Museum"), ("伦敦塔桥", "Tower Bridge")),
    ("巴黎", "Paris", ("埃菲尔铁塔", "the Eiffel Tower"), ("卢浮宫", "the Louvre")),
    ("东京", "Tokyo", ("浅草寺", "Senso-ji Temple"), ("上野公园", "Ueno Park")),
    ("纽约", "New York", ("中央公园", "Central Park"), ("自由女神像", "the Statue of Liberty")),
    ("罗马", "Rome", ("斗兽场", "the Colosseum"), ("特雷维喷泉", "the Trevi Fountain")),
]
CAPITALS = [
    ("中国", "China", "北京", "Beijing"), ("日本", "Japan", "东京", "Tokyo"),
    ("法国", "France", "巴黎", "Paris"), ("英国", "the United Kingdom", "伦敦", "London"),
    ("德国", "Germany", "柏林", "Berlin"), ("意大利", "Italy", "罗马", "Rome"),
    ("俄罗斯", "Russia", "莫斯科", "Moscow"), ("美国", "the United States", "华盛顿", "Washington"),
    ("加拿大", "Canada", "渥太华", "Ottawa"), ("澳大利亚", "Australia", "堪培拉", "Canberra"),
    ("印度", "India", "新德里", "New Delhi"), ("埃及", "Egypt", "开罗", "Cairo"),
    ("巴西", "Brazil", "巴西利亚", "Brasilia"), ("韩国", "South Korea", "首尔", "Seoul"),
    ("西班牙", "Spain", "马德里", "Madrid"), ("泰国", "Thailand", "曼谷", "Bangkok"),
    ("越南", "Vietnam", "河内", "Hanoi"), ("墨西哥", "Mexico", "墨西哥城", "Mexico City"),
]
FOODS = [
    ("米饭", "rice"), ("面条", "noodles"), ("饺子", "dumplings"), ("豆腐", "tofu"),
    ("西红柿炒鸡蛋", "tomato and egg stir-fry"), ("包子", "steamed buns"), ("清蒸鱼", "steamed fish"),
    ("青菜", "green vegetables"), ("火锅", "hot pot"), ("馄饨", "wontons"), ("烤鸭", "roast duck"),
    ("粥", "rice porridge"), ("月饼", "mooncakes"), ("炒饭", "fried rice"),
]
REASONS = [
    ("它很好吃", "it tastes good"), ("它很健康", "it is healthy"),
    ("做起来很简单", "it is easy to make"), ("它让人想起家乡", "it reminds people of home"),
    ("价格不贵", "it is not expensive"), ("全家人都喜欢", "the whole family likes it"),
]
FRUITS = [
    ("苹果", "apples", 6), ("香蕉", "bananas", 4), ("橘子", "oranges", 5), ("葡萄", "grapes", 9),
    ("西瓜", "watermelon", 3), ("梨", "pears", 5), ("桃子", "peaches", 8), ("草莓", "strawberries", 12),
]
WEATHER = [
    ("晴天", "sunny"), ("下雨", "rainy"), ("下雪", "snowy"), ("多云", "cloudy"),
    ("刮大风", "very windy"), ("阴天", "overcast"), ("有雾", "foggy"),
]
DAYS = [
    ("星期一", "Monday"), ("星期二", "Tuesday"), ("星期三", "Wednesday"), ("星期四", "Thursday"),
    ("星期五", "Friday"), ("星期六", "Saturday"), ("星期天", "Sunday"),
]
SEASONS = [
    ("春天", "spring", "天气变暖，花都开了", "the weather gets warmer and the flowers bloom"),
    ("夏天", "summer", "天气很热，很多人去游泳", "it is hot and many people go swimming"),
    ("秋天", "autumn", "树叶变黄，农民开始收获", "the leaves turn yellow and farmers bring in the harvest"),
    ("冬天", "winter", "天气寒冷，北方常常下雪", "it is cold and it often snows in the north"),
]
ACTIVITIES = [
    ("喝一杯茶", "drinks a cup of tea"), ("读半个小时书", "reads for half an hour"),
    ("做早饭", "makes breakfast"), ("出去跑步", "goes for a run"), ("听新闻", "listens to the news"),
    ("打扫房间", "cleans the room"), ("练习书法", "practises calligraphy"), ("遛狗", "walks the dog"),
]
PLACES = [
    ("学校", "school"), ("公司", "the office"), ("医院", "the hospital"), ("图书馆", "the library"),
    ("市场", "the market"), ("工厂", "the factory"), ("公园", "the park"), ("实验室", "the laboratory"),
]
SUBJECTS = [
    ("数学", "mathematics"), ("物理", "physics"), ("化学", "chemistry"), ("历史", "history"),
    ("地理", "geography"), ("音乐", "music"), ("英语", "English"), ("生物", "biology"),
    ("计算机科学", "computer science"), ("经济学", "economics"), ("中文", "Chinese"),
]
OPINIONS = [
    ("很有意思", "interesting"), ("有点难", "a little difficult"), ("非常有用", "very useful"),
    ("比想象中容易", "easier than expected"), ("需要很多练习", "demanding a lot of practice"),
]
SPORTS = [
    ("打篮球", "plays basketball"), ("踢足球", "plays football"), ("打乒乓球", "plays table tennis"),
    ("去游泳", "goes swimming"), ("去跑步", "goes running"), ("下围棋", "plays Go"),
    ("打羽毛球", "plays badminton"), ("骑自行车", "goes cycling"),
]
TECH_TASKS = [
    ("写报告", "write reports"), ("学习编程", "learn programming"), ("和朋友视频聊天", "video chat with friends"),
    ("查资料", "look up information"), ("处理照片", "edit photos"), ("管理家里的账目", "keep the household accounts"),
    ("训练一个小的语言模型", "train a small language model"), ("画设计图", "draw design plans"),
]
DIGITS_ZH = "零一二三四五六七八九"
NUM_EN = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]
SCIENCE = [
    ("在标准大气压下，水在一百摄氏度沸腾。", "At standard atmospheric pressure, water boils at one hundred degrees Celsius."),
    ("地球绕着太阳转，一圈大约需要三百六十五天。", "The Earth goes around the Sun, and one orbit takes about three hundred and sixty-five days."),
    ("月亮本身不发光，它反射太阳的光。", "The Moon does not shine by itself; it reflects the light of the Sun."),
    ("植物通过光合作用把阳光变成养分。", "Plants turn sunlight into nutrients through photosynthesis."),
    ("人的心脏一刻不停地把血液送到全身。", "The human heart pumps blood through the whole body without stopping."),
    ("声音在空气中的速度比光慢得多。", "Sound travels through air much more slowly than light."),
    ("冰的密度比水小，所以冰会浮在水面上。", "Ice is less dense than water, so ice floats on water."),
    ("水由氢和氧两种元素组成。", "Water is made of two elements, hydrogen and oxygen."),
    ("太阳系有八大行星，离太阳最近的是水星。", "The solar system has eight planets, and Mercury is the closest to the Sun."),
    ("木星是太阳系中最大的行星。", "Jupiter is the largest planet in the solar system."),
    ("蜜蜂在花朵之间传播花粉。", "Bees carry pollen from flower to flower."),
    ("三角形的内角和是一百八十度。", "The angles of a triangle add up to one hundred and eighty degrees."),
    ("一个正方形有四条相等的边。", "A square has four equal sides."),
    ("电流通过导线时会产生热量。", "An electric current produces heat when it flows through a wire."),
    ("鲸鱼是哺乳动物，用肺呼吸。", "Whales are mammals and breathe with lungs."),
    ("彩虹是阳光经过雨滴折射形成的。", "A rainbow forms when sunlight is refracted by raindrops."),
    ("计算机用二进制表示数据，只有零和一。", "Computers represent data in binary, using only zeros and ones."),
    ("语言模型通过预测下一个词来学习语言。", "A language model learns language by predicting the next word."),
]
HISTORY = [
    ("长城有两千多年的历史，是古代的防御工程。", "The Great Wall is more than two thousand years old and was built for defence."),
    ("造纸术是中国古代的四大发明之一。", "Papermaking is one of the four great inventions of ancient China."),
    ("指南针、火药和印刷术也是中国古代的重要发明。", "The compass, gunpowder and printing were also important inventions of ancient China."),
    ("丝绸之路连接了古代的中国和西方。", "The Silk Road connected ancient China with the West."),
    ("秦始皇统一了文字和度量衡。", "The First Emperor of Qin unified the writing system and the units of measurement."),
    ("古埃及人建造了金字塔。", "The ancient Egyptians built the pyramids."),
    ("孔子是春秋时期的思想家和教育家。", "Confucius was a thinker and teacher of the Spring and Autumn period."),
    ("大运河连接了中国的南方和北方。", "The Grand Canal linked the south and the north of China."),
    ("古希腊的奥林匹克运动会已有很长的历史。", "The Olympic Games of ancient Greece have a very long history."),
    ("蒸汽机推动了工业革命。", "The steam engine drove the Industrial Revolution."),
    ("一九六九年，人类第一次登上月球。", "In 1969, people walked on the Moon for the first time."),
    ("唐朝的长安是当时世界上最大的城市之一。", "Chang'an in the Tang dynasty was one of the largest cities in the world at that time."),
]
ANIMALS = [
    ("熊猫喜欢吃竹子，主要生活在四川的山里。", "Pandas like to eat bamboo and live mainly in the mountains of Sichuan."),
    ("猫喜欢晒太阳，也喜欢抓老鼠。", "Cats like to lie in the sun, and they like to catch mice."),
    ("狗是人类忠实的朋友。", "Dogs are loyal friends of people."),
    ("大象是陆地上最大的动物。", "Elephants are the largest animals on land."),
    ("长颈鹿的脖子很长，可以吃到高处的树叶。", "Giraffes have long necks and can reach leaves high up in trees."),
    ("候鸟在秋天飞到温暖的南方。", "Migrating birds fly to the warm south in autumn."),
    ("骆驼可以很多天不喝水。", "Camels can go many days without drinking water."),
    ("蚂蚁能搬动比自己重很多的东西。", "Ants can carry things much heavier than themselves."),
    ("海豚很聪明，会用声音互相交流。", "Dolphins are clever and talk to each other with sounds."),
    ("兔子的耳朵很长，跑得很快。", "Rabbits have long ears and run very fast."),
]
GENERAL = [
    ("一个星期有七天。", "A week has seven days."), ("一年有十二个月。", "A year has twelve months."),
    ("一天有二十四个小时。", "A day has twenty-four hours."), ("一个小时有六十分钟。", "An hour has sixty minutes."),
    ("多读书可以开阔眼界。", "Reading widely broadens the mind."),
    ("早睡早起身体好。", "Going to bed early and getting up early keeps you healthy."),
    ("学习一门语言需要每天练习。", "Learning a language takes practice every day."),
    ("过马路的时候要看红绿灯。", "Look at the traffic lights when you cross the road."),
    ("春节是中国最重要的传统节日。", "The Spring Festival is the most important traditional festival in China."),
    ("中秋节的时候，人们一起吃月饼、看月亮。", "At the Mid-Autumn Festival, people eat mooncakes and look at the moon together."),
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _zh_number(n: int) -> str:
    """Chinese numerals for 0..99 (``十二``, ``三十五``)."""
    if n < 10:
        return DIGITS_ZH[n]
    tens, ones = divmod(n, 10)
    head = "" if tens == 1 else DIGITS_ZH[tens]
    return head + "十" + (DIGITS_ZH[ones] if ones else "")


def _zh_count(n: int) -> str:
    """A number before a measure word: ``两斤``, not ``二斤``."""
    return "两" if n == 2 else _zh_number(n)


Sentence = tuple[str, str]


def _daily(r: random.Random) -> Sentence:
    (pz, pe), (az, ae), (lz, le) = r.choice(PEOPLE), r.choice(ACTIVITIES), r.choice(PLACES)
    h = r.randint(5, 9)
    return (f"{pz}每天早上{_zh_number(h)}点起床，先{az}，然后去{lz}。",
            f"{_cap(pe)} gets up at {h} o'clock every morning, {ae} first, and then goes to {le}.")


def _weather(r: random.Random) -> Sentence:
    (dz, de), city, (wz, we) = r.choice(DAYS), r.choice(CITIES), r.choice(WEATHER)
    t = r.randint(-5, 35)
    tz = f"零下{_zh_number(-t)}" if t < 0 else _zh_number(t)
    return (f"{dz}{city[0]}的天气是{wz}，气温大约{tz}度。",
            f"On {de}, the weather in {city[1]} is {we}, and the temperature is about {t} degrees.")


def _food(r: random.Random) -> Sentence:
    (pz, pe), (fz, fe), (rz, re_) = r.choice(PEOPLE), r.choice(FOODS), r.choice(REASONS)
    return (f"{pz}最喜欢吃{fz}，因为{rz}。", f"{_cap(pe)} likes {fe} best, because {re_}.")


def _travel(r: random.Random) -> Sentence:
    (pz, pe), season, city = r.choice(PEOPLE), r.choice(SEASONS), r.choice(CITIES)
    sz, se = r.choice(city[2:])
    return (f"去年{season[0]}，{pz}和家人一起去{city[0]}旅行，参观了{sz}。",
            f"Last {season[1]}, {pe} travelled to {city[1]} with the family and visited {se}.")


def _study(r: random.Random) -> Sentence:
    (pz, pe), (sz, se), (oz, oe) = r.choice(PEOPLE), r.choice(SUBJECTS), r.choice(OPINIONS)
    return (f"{pz}正在学习{sz}，觉得这门课{oz}。", f"{_cap(pe)} is studying {se} and finds the course {oe}.")


def _shopping(r: random.Random) -> Sentence:
    (pz, pe), (fz, fe, price) = r.choice(PEOPLE), r.choice(FRUITS)
    n = r.randint(1, 6)
    return (f"{pz}在市场买了{_zh_count(n)}斤{fz}，每斤{price}元，一共花了{n * price}元。",
            f"{_cap(pe)} bought {n} jin of {fe} at the market at {price} yuan per jin, {n * price} yuan in total.")


def _sport(r: random.Random) -> Sentence:
    (pz, pe), (dz, de), (sz, se) = r.choice(PEOPLE), r.choice(DAYS), r.choice(SPORTS)
    return (f"{pz}每个{dz}下午都{sz}。", f"{_cap(pe)} {se} every {de} afternoon.")


def _tech(r: random.Random) -> Sentence:
    (pz, pe), (tz, te) = r.choice(PEOPLE), r.choice(TECH_TASKS)
    return (f"{pz}常常用电脑{tz}。", f"{_cap(pe)} often uses a computer to {te}.")


def _capital(r: random.Random) -> Sentence:
    cz, ce, kz, ke = r.choice(CAPITALS)
    return (f"{cz}的首都是{kz}。", f"The capital of {ce} is {ke}.")


def _arith(r: random.Random) -> Sentence:
    a, b = r.randint(0, 10), r.randint(0, 10)
    op = r.randrange(3)
    if op == 0:
        return (f"{_zh_number(a)}加{_zh_number(b)}等于{_zh_number(a + b)}。",
                f"{_cap(NUM_EN[a])} plus {NUM_EN[b]} equals {NUM_EN[a + b]}.")
    if op == 1:
        a, b = max(a, b), min(a, b)
        return (f"{a}减{b}等于{a - b}。", f"{a} minus {b} equals {a - b}.")
    return (f"{a}乘以{b}等于{a * b}。", f"{a} times {b} equals {a * b}.")


def _season(r: random.Random) -> Sentence:
    sz, se, dz, de = r.choice(SEASONS)
    return (f"{sz}的时候，{dz}。", f"In {se}, {de}.")


def _fact(pool: list[Sentence]) -> Callable[[random.Random], Sentence]:
    return lambda r: r.choice(pool)


# topic -> sentence makers; a document draws mostly from one topic plus a few general sentences.
TOPICS: dict[str, list[Callable[[random.Random], Sentence]]] = {
    "daily": [_daily, _daily, _sport, _food],
    "weather": [_weather, _weather, _season],
    "food": [_food, _food, _shopping],
    "travel": [_travel, _travel, _weather, _capital],
    "study": [_study, _study, _arith, _fact(SCIENCE)],
    "shopping": [_shopping, _shopping, _food],
    "sport": [_sport, _sport, _daily],
    "tech": [_tech, _tech, _fact(SCIENCE)],
    "geography": [_capital, _capital, _travel],
    "math": [_arith, _arith, _arith],
    "science": [_fact(SCIENCE), _fact(SCIENCE), _fact(ANIMALS)],
    "history": [_fact(HISTORY), _fact(HISTORY), _travel],
    "nature": [_fact(ANIMALS), _season, _weather],
}
TOPIC_NAMES = sorted(TOPICS)


def _document(r: random.Random) -> list[Sentence]:
    makers = TOPICS[r.choice(TOPIC_NAMES)]
    sentences = [r.choice(makers)(r) for _ in range(r.randint(3, 8))]
    if r.random() < 0.3:
        sentences.insert(r.randrange(len(sentences) + 1), r.choice(GENERAL))
    return sentences


def generate(seed: int = SEED) -> dict[str, str]:
    """Return ``{file name: content}`` for the whole corpus (pure function of ``seed``)."""
    r = random.Random(seed)
    out: dict[str, str] = {}
    zh_docs = ["".join(z for z, _ in _document(r)) for _ in range(FILES["zh.txt"])]
    out["zh.txt"] = "\n\n".join(zh_docs) + "\n"
    en_docs = [" ".join(e for _, e in _document(r)) for _ in range(FILES["en.txt"])]
    out["en.txt"] = "\n\n".join(en_docs) + "\n"
    lines = []
    for _ in range(FILES["mixed.jsonl"]):
        doc = _document(r)
        style = r.randrange(3)
        if style == 0:  # sentence by sentence translation
            text = "\n".join(f"{e} {z}" for z, e in doc)
        elif style == 1:  # English paragraph, then its Chinese version
            text = " ".join(e for _, e in doc) + "\n" + "".join(z for z, _ in doc)
        else:  # code-switching: each sentence in a random language
            text = " ".join(z if r.random() < 0.5 else e for z, e in doc)
        lines.append(json.dumps({"text": text}, ensure_ascii=False))
    out["mixed.jsonl"] = "\n".join(lines) + "\n"
    return out


def write_corpus(out_dir: str | Path = CORPUS_DIR, seed: int = SEED) -> list[Path]:
    """Write the generated files into ``out_dir`` (atomically, one file at a time)."""
    out_dir = Path(out_dir)
    paths = []
    for name, text in generate(seed).items():
        atomic_write_text(out_dir / name, text)
        paths.append(out_dir / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(CORPUS_DIR), help="output directory (default: the package's)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for path in write_corpus(args.out, args.seed):
        print(f"{path}  {path.stat().st_size} bytes")  # a developer script, not library code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
