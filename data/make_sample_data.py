"""Write the bundled sample data sets (data/llama2_sample.jsonl, data/baichuan2_sample.jsonl).

Both files are small, made-up stand-ins for the tutorials' data sets so that the demo runs offline:
  * llama2_sample.jsonl   - news-like articles with 2-4 sentence highlights (columns article, highlights)
  * baichuan2_sample.jsonl - customer-support requests and answers
                            (columns instruction, category, intent, response)
The text comes from the templates and word lists below, filled in with a seeded random generator, so
running this script again gives byte-identical files:  python data/make_sample_data.py
The facts in each highlight are repeated in its article, so a tiny model can learn to copy them.
"""
import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
NUM_ARTICLES = 300
NUM_SUPPORT_DIALOGUES = 400

# ----------------------------------------------------------------------------------------------
# News articles
# ----------------------------------------------------------------------------------------------
FIRST_NAMES = ["Maria", "James", "Aisha", "Tom", "Elena", "David", "Priya", "Samuel", "Grace", "Lucas",
               "Nora", "Victor", "Hannah", "Omar", "Clara", "Peter", "Yuki", "Daniel", "Fatima", "Robert",
               "Ines", "George", "Leila", "Martin", "Sofia", "Ben", "Chloe", "Ahmed", "Laura", "Kevin"]
LAST_NAMES = ["Lopez", "Carter", "Okafor", "Brennan", "Novak", "Hughes", "Sharma", "Mensah", "Whitfield",
              "Moreau", "Lindqvist", "Petrov", "Kaplan", "Haddad", "Fischer", "Doyle", "Tanaka", "Reyes",
              "Osei", "Marsh", "Duarte", "Holm", "Nasser", "Quinn", "Romano", "Fleming", "Abara", "Kerr"]
TOWNS = ["Millbrook", "Easton Vale", "Port Ardley", "Ashford Green", "Lakemoor", "Redcliffe", "Northam",
         "Stonebridge", "Kingsmere", "Harlow Bay", "Westfield", "Oakridge", "Brackley", "Fenwick",
         "Silverton", "Cobham Heath", "Dunmore", "Elmstead", "Greyhaven", "Thornbury"]
REGIONS = ["the northern province", "the coastal district", "the river valley", "the eastern county",
           "the capital region", "the southern highlands", "the lake country", "the western plains"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
COMPANIES = ["Brightwave", "Northstar Systems", "Harbor Foods", "Keystone Energy", "Bluepeak Labs",
             "Meridian Motors", "Cedar Health", "Lumen Networks", "Atlas Freight", "Greenleaf Farms"]
PRODUCTS = ["a folding electric bicycle", "a low-cost home battery", "a water filter for rural homes",
            "a budget smartphone", "a heat pump for small flats", "a delivery drone", "a hearing aid",
            "a solar roof tile", "a learning app for children", "a smart thermostat"]
TEAMS = ["Rovers", "United", "Athletic", "City", "Wanderers", "Rangers", "Albion", "Harriers"]
JOBS = ["teacher", "nurse", "bus driver", "shop owner", "engineer", "farmer", "student", "pensioner",
        "software developer", "chef", "carpenter", "librarian"]


def person(rng):
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def number_words(rng):
    return rng.choice(["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"])


# Each topic: facts drawn once per article, a lead, a pool of body sentences, quotes, and highlights.
# Templates use str.format with the facts dict; body sentences are sampled without replacement.
TOPICS = {
    "council_budget": {
        "facts": lambda rng: {
            "town": rng.choice(TOWNS), "official": person(rng), "amount": rng.randint(2, 90),
            "share": rng.randint(3, 19), "project": rng.choice(
                ["a new library", "road repairs", "two primary schools", "a flood barrier",
                 "a community clinic", "cheaper bus fares", "a youth centre", "street lighting"]),
            "day": rng.choice(WEEKDAYS), "critic": person(rng), "votes_for": rng.randint(12, 30),
            "votes_against": rng.randint(2, 11),
        },
        "headline": "{town} council approves {amount} million budget",
        "lead": "Councillors in {town} on {day} approved a budget of {amount} million that sets aside money "
                "for {project}, after a long debate in which {votes_for} members voted in favour and "
                "{votes_against} against.",
        "body": [
            "The plan raises local taxes by {share} percent, the first increase in four years.",
            "Council leader {official} said the town could no longer delay spending on {project}.",
            "Officials said the money would be released in stages over the next three years.",
            "Opposition members argued that families were already struggling with higher bills.",
            "A public consultation earlier this year drew more than two thousand written responses.",
            "Most of those who replied said they wanted better roads and safer streets.",
            "The budget also includes a small fund for local charities and sports clubs.",
            "Council staff will publish a progress report every six months, the meeting agreed.",
            "Business groups in {town} gave the plan a cautious welcome.",
            "Some residents watched the debate from the public gallery, and a few held signs.",
            "The council said it had cut its own running costs by closing two old offices.",
            "Work on {project} is expected to begin before the end of next year.",
            "The last major building project in {town} finished late and over budget.",
            "Councillors promised that this time an independent panel would check the accounts.",
            "Neighbouring towns in {region} are facing similar choices about spending.",
        ],
        "quotes": [
            "\"This is a budget for the next generation, not the next election,\" {official} told the chamber.",
            "\"People are being asked to pay more while services keep getting worse,\" said councillor {critic}.",
            "\"We listened to residents, and they told us what mattered to them,\" {official} said.",
        ],
        "highlights": [
            "{town} council approves a {amount} million budget by {votes_for} votes to {votes_against}.",
            "The plan funds {project} and raises local taxes by {share} percent.",
            "Critic {critic} says families are already struggling with higher bills.",
            "Work on {project} should start before the end of next year.",
        ],
    },
    "storm": {
        "facts": lambda rng: {
            "region": rng.choice(REGIONS), "town": rng.choice(TOWNS), "homes": rng.randint(2, 60) * 100,
            "wind": rng.randint(80, 160), "rain": rng.randint(40, 220), "name": rng.choice(
                ["Agnes", "Bruno", "Celia", "Dermot", "Edith", "Franz", "Gwen", "Hector"]),
            "official": person(rng), "day": rng.choice(WEEKDAYS), "rescued": rng.randint(3, 80),
        },
        "headline": "Storm {name} leaves thousands without power in {region}",
        "lead": "Storm {name} swept across {region} on {day}, bringing winds of up to {wind} kilometres an "
                "hour and leaving about {homes} homes without electricity.",
        "body": [
            "Some areas received {rain} millimetres of rain in less than a day.",
            "Emergency crews rescued {rescued} people from cars and houses cut off by flood water.",
            "Trains between {town} and the coast were cancelled for most of the afternoon.",
            "Schools in the worst-hit villages closed early and sent pupils home.",
            "Engineers worked through the night to repair fallen power lines.",
            "The weather service had issued its highest warning two days before the storm arrived.",
            "Several roads remained closed because of fallen trees and landslides.",
            "Farmers said fields that were ready for harvest had been flattened.",
            "Volunteers opened a sports hall in {town} as a shelter for families who had to leave home.",
            "Insurance companies said it was too early to estimate the cost of the damage.",
            "Forecasters expect calmer weather by the end of the week, although more rain is likely.",
            "Residents were told to avoid walking near rivers, which could rise quickly.",
            "It was the strongest storm to hit the area in more than a decade.",
            "Power company {company} said most customers should be reconnected within two days.",
        ],
        "quotes": [
            "\"The water came up to the second step in under an hour,\" said one resident of {town}.",
            "\"Please stay at home unless your journey is essential,\" said emergency chief {official}.",
            "\"Our crews will not stop until every home has power again,\" {official} said.",
        ],
        "highlights": [
            "Storm {name} brings winds of up to {wind} kilometres an hour to {region}.",
            "About {homes} homes lost power and {rescued} people were rescued from flood water.",
            "Trains from {town} were cancelled and several roads remain closed.",
            "Forecasters expect calmer weather by the end of the week.",
        ],
    },
    "football": {
        "facts": lambda rng: {
            "home": f"{rng.choice(TOWNS)} {rng.choice(TEAMS)}", "away": f"{rng.choice(TOWNS)} {rng.choice(TEAMS)}",
            "hg": rng.randint(2, 5), "ag": rng.randint(0, 1), "scorer": person(rng), "coach": person(rng),
            "crowd": rng.randint(8, 60) * 1000, "minute": rng.randint(60, 89), "day": rng.choice(WEEKDAYS),
            "place": rng.choice(["first", "second", "third", "fourth"]),
        },
        "headline": "{home} beat {away} {hg}-{ag}",
        "lead": "{home} beat {away} {hg}-{ag} on {day} in front of a crowd of {crowd}, with {scorer} "
                "scoring twice to move the club up to {place} place in the league.",
        "body": [
            "The home side started quickly and took the lead after only eight minutes.",
            "{scorer} added the second goal in the {minute}th minute with a low shot from outside the box.",
            "{away} had chances of their own but their forwards were wasteful in front of goal.",
            "The visiting goalkeeper made several fine saves to keep the score respectable.",
            "It was the third win in a row for {home}, who struggled at the start of the season.",
            "Coach {coach} made two changes at half time, bringing on younger players.",
            "Fans sang for most of the second half despite the cold and the rain.",
            "The club said ticket sales this season are the highest for twenty years.",
            "{away} remain in the lower half of the table after a run of poor results.",
            "The referee showed four yellow cards in a bad-tempered second half.",
            "Next week {home} travel to face the league leaders in what could be a decisive match.",
            "Medical staff will check a knee injury suffered by one of the defenders.",
            "Young players from the club's academy have played an important part this season.",
        ],
        "quotes": [
            "\"I am proud of how hard the players worked for each other,\" said coach {coach}.",
            "\"We made too many mistakes, and at this level you are punished,\" the {away} captain said.",
            "\"The fans pushed us on, especially in the last twenty minutes,\" said {scorer}.",
        ],
        "highlights": [
            "{home} beat {away} {hg}-{ag} in front of {crowd} fans.",
            "{scorer} scores twice, including a low shot in the {minute}th minute.",
            "The win moves {home} up to {place} place in the league.",
        ],
    },
    "product_launch": {
        "facts": lambda rng: {
            "company": rng.choice(COMPANIES), "product": rng.choice(PRODUCTS), "price": rng.randint(49, 1900),
            "ceo": person(rng), "town": rng.choice(TOWNS), "jobs": rng.randint(2, 40) * 10,
            "month": rng.choice(MONTHS), "analyst": person(rng), "units": rng.randint(5, 200) * 1000,
        },
        "headline": "{company} unveils {product}",
        "lead": "{company} has unveiled {product} that will go on sale in {month} for {price} dollars, "
                "the company's chief executive {ceo} announced at an event in {town}.",
        "body": [
            "The company said it hopes to sell {units} units in the first year.",
            "A new factory in {town} will create about {jobs} jobs, according to the firm.",
            "Early reviewers praised the design but said the battery life could be better.",
            "{company} has spent three years and a large part of its budget developing the product.",
            "Competitors are expected to release similar products later this year.",
            "Shares in the company rose slightly after the announcement.",
            "The product will first be sold online and later in selected shops.",
            "Customers who order early will receive a free two-year warranty.",
            "The company said most of the parts are made by suppliers within the country.",
            "Analysts said the price was lower than many had expected.",
            "{company} lost money last year but says it expects a profit within two years.",
            "The firm plans to sell the product in other countries from next spring.",
            "A small group of staff tested early versions at home for six months.",
        ],
        "quotes": [
            "\"We wanted to build something ordinary families can actually afford,\" said {ceo}.",
            "\"The real test will be whether people still use it after the first month,\" analyst {analyst} said.",
            "\"This is the most important launch in our history,\" {ceo} told the audience.",
        ],
        "highlights": [
            "{company} unveils {product} priced at {price} dollars.",
            "It goes on sale in {month}, and the firm hopes to sell {units} units in the first year.",
            "A new factory in {town} will create about {jobs} jobs.",
        ],
    },
    "health_study": {
        "facts": lambda rng: {
            "people": rng.randint(2, 90) * 100, "years": rng.randint(2, 15), "percent": rng.randint(10, 45),
            "habit": rng.choice(["walking for thirty minutes a day", "eating more vegetables",
                                 "sleeping at least seven hours", "cutting down on sugary drinks",
                                 "reading before bed", "gardening at weekends", "cycling to work"]),
            "outcome": rng.choice(["heart disease", "memory problems", "type 2 diabetes", "depression",
                                   "high blood pressure", "back pain"]),
            "lead_author": person(rng), "university": f"the University of {rng.choice(TOWNS)}",
            "doctor": person(rng),
        },
        "headline": "Study links {habit} to lower risk of {outcome}",
        "lead": "People who kept up {habit} were {percent} percent less likely to develop {outcome}, "
                "according to a study of {people} adults followed for {years} years by researchers at "
                "{university}.",
        "body": [
            "The researchers asked volunteers about their daily routines every year.",
            "They also took into account age, income, smoking and family history.",
            "The link remained after those factors were considered, the team said.",
            "However, the study shows an association and cannot prove cause and effect.",
            "Lead author {lead_author} said the results were encouraging but should be confirmed.",
            "The volunteers were aged between forty and seventy when the study began.",
            "Women and men appeared to benefit to a similar degree.",
            "The study was paid for by a public research fund and a medical charity.",
            "Earlier, smaller studies had suggested a similar effect.",
            "Doctors said simple changes to daily habits are often the hardest to keep up.",
            "The team now plans a trial in which some volunteers will be asked to change their routine.",
            "The findings were published in a medical journal this week.",
            "Health services spend a large share of their budgets treating {outcome}.",
        ],
        "quotes": [
            "\"Small, regular habits seem to add up over the years,\" said {lead_author}.",
            "\"This is good news, but nobody should stop taking their medicine because of one study,\" said Dr {doctor}.",
            "\"We need to understand why some people find it easier to keep going than others,\" {lead_author} added.",
        ],
        "highlights": [
            "A study of {people} adults over {years} years links {habit} to a {percent} percent lower risk of {outcome}.",
            "Researchers at {university} say the study shows an association, not proof.",
            "A trial is planned to test whether changing the habit makes a difference.",
        ],
    },
    "court_case": {
        "facts": lambda rng: {
            "defendant": person(rng), "job": rng.choice(JOBS), "town": rng.choice(TOWNS),
            "crime": rng.choice(["stealing money from a charity", "selling fake concert tickets",
                                 "dangerous driving", "a burglary at a jewellery shop",
                                 "fraud involving a building firm", "setting fire to a warehouse"]),
            "months": rng.randint(6, 60), "judge": person(rng), "amount": rng.randint(5, 400) * 1000,
            "day": rng.choice(WEEKDAYS),
        },
        "headline": "{job} from {town} jailed for {crime}",
        "lead": "A {job} from {town} has been sentenced to {months} months in prison for {crime}, "
                "after a trial that lasted two weeks.",
        "body": [
            "The court heard that the losses came to about {amount} dollars.",
            "{defendant}, who denied the charges, was found guilty by a jury on {day}.",
            "Police said the investigation took more than a year to complete.",
            "Witnesses described how the scheme was discovered by chance.",
            "The defence argued that {defendant} had acted under pressure from others.",
            "Judge {judge} said the crime had caused real harm to ordinary people.",
            "Several victims were in court to hear the sentence.",
            "The court ordered that money be paid back from the sale of a car and a house.",
            "{defendant} had no previous convictions, the court was told.",
            "Lawyers for {defendant} said they were considering an appeal.",
            "Police urged anyone who believes they were also affected to come forward.",
            "The case has led to calls for stricter checks in the industry.",
        ],
        "quotes": [
            "\"You abused the trust that people placed in you,\" Judge {judge} told the defendant.",
            "\"We are relieved that this is finally over,\" one victim said outside court.",
            "\"This sentence sends a clear message,\" a police spokesperson said.",
        ],
        "highlights": [
            "{defendant}, a {job} from {town}, is jailed for {months} months for {crime}.",
            "The court heard that the losses came to about {amount} dollars.",
            "Judge {judge} says the crime caused real harm to ordinary people.",
        ],
    },
    "science": {
        "facts": lambda rng: {
            "thing": rng.choice(["a new species of frog", "a fossilised dinosaur nest", "an ancient shipwreck",
                                 "a colony of rare bees", "a comet close to Earth", "an underground lake",
                                 "a Roman coin hoard", "a new type of bacteria"]),
            "place": rng.choice(REGIONS), "scientist": person(rng), "age": rng.randint(2, 90) * 100,
            "team": rng.randint(4, 30), "university": f"the University of {rng.choice(TOWNS)}",
            "month": rng.choice(MONTHS),
        },
        "headline": "Scientists discover {thing} in {place}",
        "lead": "A team of {team} scientists from {university} has discovered {thing} in {place}, "
                "in what they describe as one of the most important finds of recent years.",
        "body": [
            "The discovery was made in {month} during a routine survey of the area.",
            "Tests suggest that the find is about {age} years old.",
            "The team used drones and ground sensors to map the site.",
            "Local people had reported unusual signs in the area for years.",
            "{scientist}, who led the work, said the team was surprised by how well preserved it was.",
            "Samples have been sent to laboratories abroad for further tests.",
            "The site will be protected while the research continues.",
            "Students from a nearby school were invited to watch part of the work.",
            "The findings are due to be published in a scientific journal next year.",
            "Funding for the project came from a public science programme.",
            "Other experts said the discovery could change what is known about the region.",
            "The team hopes to return next summer with more equipment.",
        ],
        "quotes": [
            "\"We could hardly believe what we were seeing,\" said {scientist}.",
            "\"Finds like this happen once in a career,\" {scientist} added.",
            "\"There is still a great deal we do not understand,\" one member of the team said.",
        ],
        "highlights": [
            "Scientists from {university} discover {thing} in {place}.",
            "Tests suggest the find is about {age} years old.",
            "Team leader {scientist} says it is remarkably well preserved.",
            "The findings are due to be published next year.",
        ],
    },
    "transport": {
        "facts": lambda rng: {
            "town": rng.choice(TOWNS), "other": rng.choice(TOWNS), "minutes": rng.randint(10, 45),
            "cost": rng.randint(50, 900), "year": rng.randint(2026, 2034), "minister": person(rng),
            "stations": rng.randint(3, 14), "passengers": rng.randint(5, 90) * 1000,
        },
        "headline": "New rail line to link {town} and {other}",
        "lead": "A new rail line between {town} and {other} will cut journey times by {minutes} minutes "
                "and open in {year}, transport minister {minister} announced.",
        "body": [
            "The line will cost about {cost} million and include {stations} new stations.",
            "Officials expect about {passengers} passengers a day once the line is running.",
            "Trains will run every fifteen minutes at busy times.",
            "Some residents living near the route are worried about noise during construction.",
            "The plan was first proposed more than twenty years ago.",
            "Part of the cost will be paid by a regional development fund.",
            "Business leaders in {town} said faster links would help attract new firms.",
            "Environmental groups welcomed the plan but asked for more cycle paths near stations.",
            "Bus routes will be changed to connect with the new stations.",
            "Construction is expected to start next year after a final review of the route.",
            "Tickets will cost the same as on existing lines, the ministry said.",
            "Commuters currently face long delays on the main road between the two towns.",
        ],
        "quotes": [
            "\"This line will change how people live and work in the region,\" said {minister}.",
            "\"We have heard promises like this before, so we will believe it when we see it,\" said one commuter.",
            "\"Faster journeys mean more time with family and less time in traffic,\" {minister} said.",
        ],
        "highlights": [
            "A new rail line will link {town} and {other}, cutting journeys by {minutes} minutes.",
            "The line will cost about {cost} million and open in {year}.",
            "About {passengers} passengers a day are expected to use it.",
        ],
    },
}

# Sentences that fit any article; they lengthen articles without adding facts the summary needs.
GENERIC_SENTENCES = [
    "The announcement was discussed widely on local radio and social media.",
    "Further details are expected to be released in the coming weeks.",
    "Reporters who visited the area found mixed feelings among residents.",
    "Some people said they had not heard about the news until this week.",
    "Others said they had been following the story closely for months.",
    "Local newspapers have covered the issue on their front pages several times.",
    "A spokesperson declined to comment on the details when contacted on {day}.",
    "The story has drawn attention far beyond {region}.",
    "Officials said they would answer questions at a public meeting next month.",
    "Several community groups have asked to be included in future discussions.",
    "It is not the first time the area has made national headlines.",
    "Observers said the coming months would show whether the plans succeed.",
    "A {job} who lives nearby said the news was the main topic of conversation in town.",
    "An online petition about the issue has gathered several thousand signatures.",
    "The weather was mild and dry for most of the week.",
    "Visitors to {town} were seen taking photographs near the town hall.",
]


def make_article(rng):
    topic = TOPICS[rng.choice(sorted(TOPICS))]
    facts = topic["facts"](rng)
    # Shared filler fields, so generic sentences can name a place or a day in any topic.
    facts.setdefault("day", rng.choice(WEEKDAYS))
    facts.setdefault("region", rng.choice(REGIONS))
    facts.setdefault("town", rng.choice(TOWNS))
    facts.setdefault("official", person(rng))
    facts.setdefault("company", rng.choice(COMPANIES))
    facts["job"] = facts.get("job", rng.choice(JOBS))

    target_words = rng.randint(300, 900)
    paragraphs = [topic["lead"].format(**facts)]
    body = rng.sample(topic["body"], len(topic["body"]))
    quotes = rng.sample(topic["quotes"], len(topic["quotes"]))
    generic = rng.sample(GENERIC_SENTENCES, len(GENERIC_SENTENCES))
    words = len(paragraphs[0].split())
    # Paragraphs of 1-3 sentences until the target length; topic sentences first, then quotes and filler.
    while words < target_words and (body or quotes or generic):
        paragraph = []
        for _ in range(rng.randint(1, 3)):
            pool = body or (quotes if quotes and rng.random() < 0.5 else generic) or quotes
            if not pool:
                break
            paragraph.append(pool.pop().format(**facts))
            if quotes and rng.random() < 0.25:
                paragraph.append(quotes.pop().format(**facts))
        if paragraph:
            paragraphs.append(" ".join(paragraph))
            words += len(paragraphs[-1].split())
    # Long articles recycle the topic sentences in a "background" section, as long news stories do.
    if words < target_words:
        paragraphs.append("Background:")
        recycled = rng.sample(topic["body"] + GENERIC_SENTENCES, len(topic["body"]) + len(GENERIC_SENTENCES))
        while words < target_words and recycled:
            sentences = [recycled.pop().format(**facts) for _ in range(min(len(recycled), rng.randint(2, 4)))]
            paragraphs.append("As reported earlier: " + " ".join(sentences))
            words += len(paragraphs[-1].split())
    byline = f"By {person(rng)}, {rng.choice(TOWNS)} ({rng.choice(MONTHS)} {rng.randint(1, 28)})"
    article = byline + " -- " + "\n\n".join(paragraphs)

    count = rng.randint(2, min(4, len(topic["highlights"])))
    chosen = [topic["highlights"][0]] + rng.sample(topic["highlights"][1:], count - 1)
    highlights = "\n".join(sentence.format(**facts) for sentence in chosen)
    return {"article": article, "highlights": highlights}


# ----------------------------------------------------------------------------------------------
# Customer-support dialogues
# ----------------------------------------------------------------------------------------------
# intent -> (category, request phrasings, answer steps). "{order}", "{item}" and friends are filled in.
INTENTS = {
    "create_account": ("ACCOUNT", ["I want to open a new account", "how do I sign up for an account",
                                   "can you help me create an account", "I need to register as a new customer"],
                       ["Go to our website and click \"Sign Up\" at the top right of the page.",
                        "Enter your name, email address and a password of at least ten characters.",
                        "Open the confirmation email we send you and click the link inside it.",
                        "Once confirmed, you can add a delivery address and payment method in \"My Account\"."]),
    "delete_account": ("ACCOUNT", ["I want to close my account", "please delete my account",
                                   "how can I remove my profile and data", "I no longer want an account with you"],
                       ["Sign in and open \"My Account\", then choose \"Privacy and Data\".",
                        "Select \"Close Account\" and confirm with your password.",
                        "Any open orders must be delivered or cancelled before the account can be closed.",
                        "We remove your personal data within thirty days, except what the law requires us to keep."]),
    "edit_account": ("ACCOUNT", ["I need to change the email on my account", "how do I update my profile details",
                                 "can I change the name on my account", "I want to edit my phone number"],
                     ["Sign in and go to \"My Account\", then \"Profile\".",
                      "Click \"Edit\" next to the detail you want to change and type the new value.",
                      "For a new email address, we send a code to confirm it belongs to you.",
                      "Save your changes; they apply to all future orders straight away."]),
    "recover_password": ("ACCOUNT", ["I forgot my password", "I can't log in to my account",
                                     "how do I reset my password", "my password is not working anymore"],
                         ["On the sign-in page, click \"Forgot password?\".",
                          "Enter the email address linked to your account and we will send a reset link.",
                          "The link is valid for one hour, so please use it soon.",
                          "If the email does not arrive, check your spam folder or ask us to resend it."]),
    "place_order": ("ORDER", ["I want to buy {item}", "how do I place an order for {item}",
                              "can you help me order {item}", "I'd like to purchase {item}"],
                    ["Search for {item} on our website and open the product page.",
                     "Choose the size or colour you want and click \"Add to Basket\".",
                     "Open your basket, check the items and click \"Checkout\".",
                     "Confirm your delivery address and payment details, then place the order.",
                     "You will receive a confirmation email with your order number within a few minutes."]),
    "cancel_order": ("ORDER", ["I need to cancel order {order}", "please cancel my order {order}",
                               "how can I cancel the order I placed yesterday", "I changed my mind about order {order}"],
                     ["Sign in and open \"My Orders\".",
                      "Find order {order} and click \"Cancel Order\".",
                      "Choose a reason from the list and confirm the cancellation.",
                      "If the order has already shipped, you can refuse the parcel or return it for a refund.",
                      "Your money is returned to the original payment method within five working days."]),
    "change_order": ("ORDER", ["I want to change the items in order {order}", "can I add something to my order {order}",
                               "how do I change the size in my order", "I need to modify order {order}"],
                     ["Orders can be changed until they are packed, usually within two hours of ordering.",
                      "Open \"My Orders\", select order {order} and click \"Edit Order\".",
                      "Add, remove or change items, then confirm the new total.",
                      "If the edit button is greyed out, the order is already being packed and cannot be changed."]),
    "track_order": ("ORDER", ["where is my order {order}", "how can I track order {order}",
                              "I want to know the status of my order", "my order {order} has not arrived yet"],
                    ["Open \"My Orders\" and select order {order} to see its current status.",
                     "Once it has shipped, you will find a tracking link from the delivery company there.",
                     "Tracking can take up to twenty-four hours to update after dispatch.",
                     "If the parcel has not moved for three days, contact us and we will investigate."]),
    "get_refund": ("REFUND", ["I want a refund for {item}", "how do I get my money back for order {order}",
                              "I'd like to be refunded", "can I get a refund for a faulty {item}"],
                   ["Open \"My Orders\", choose the order and click \"Return or Refund\".",
                    "Select the items and tell us what went wrong; photos help for damaged goods.",
                    "Print the free return label and drop the parcel at any post office.",
                    "We issue the refund as soon as the parcel reaches our warehouse, usually within a week."]),
    "check_refund_policy": ("REFUND", ["what is your refund policy", "can I return something after thirty days",
                                       "do you refund sale items", "how long do I have to ask for a refund"],
                            ["Most items can be returned within thirty days of delivery for a full refund.",
                             "Items must be unused and in their original packaging.",
                             "Sale items can be returned too, but personalised items cannot.",
                             "Faulty products can be returned for up to one year."]),
    "track_refund": ("REFUND", ["where is my refund", "I have not received my refund for order {order}",
                                "how long does a refund take", "can you check the status of my refund"],
                     ["Refunds are processed within two working days of your return reaching us.",
                      "Your bank may then take three to five working days to show the money.",
                      "You can see the refund status under order {order} in \"My Orders\".",
                      "If it has been more than ten days, send us the order number and we will check."]),
    "change_shipping_address": ("SHIPPING", ["I need to change the delivery address for order {order}",
                                             "can I ship my order to a different address",
                                             "I moved, how do I update my shipping address",
                                             "please send order {order} to my office instead"],
                                ["If the order has not shipped, open it in \"My Orders\" and click \"Change Address\".",
                                 "Enter the new address and check the postcode carefully.",
                                 "Once an order has shipped, the address can only be changed by the delivery company.",
                                 "Use the tracking link to ask the courier to redirect the parcel."]),
    "set_up_shipping_address": ("SHIPPING", ["how do I add a shipping address", "I want to save a new delivery address",
                                             "can I have two delivery addresses", "where do I set my default address"],
                                ["Go to \"My Account\" and open \"Addresses\".",
                                 "Click \"Add Address\" and fill in the details.",
                                 "Tick \"Use as default\" if you want it selected automatically at checkout.",
                                 "You can store up to ten addresses and choose one for each order."]),
    "check_payment_methods": ("PAYMENT", ["what payment methods do you accept", "can I pay with {payment}",
                                          "do you take {payment}", "which ways can I pay"],
                              ["We accept credit and debit cards, {payment}, bank transfer and gift cards.",
                               "You choose the payment method at the last step of checkout.",
                               "Cards are charged when the order ships, not when it is placed.",
                               "For bank transfers, the order ships after the payment has arrived."]),
    "payment_issue": ("PAYMENT", ["my payment was declined", "I was charged twice for order {order}",
                                  "there is a problem with my payment", "why did my card payment fail"],
                      ["First, check that the card details and billing address match what your bank holds.",
                       "Some banks block online payments until you approve them in their app.",
                       "If you see two charges, one is usually a temporary hold that disappears within three days.",
                       "If the problem continues, try another payment method or send us the order number."]),
    "check_invoice": ("INVOICE", ["I want to see the invoice for order {order}", "where can I find my invoices",
                                  "can I check my last invoice", "how do I view my bills"],
                      ["Sign in and open \"My Orders\".",
                       "Every order has a \"View Invoice\" button once it has shipped.",
                       "Invoices for the last six years are kept in your account.",
                       "You can download each invoice as a PDF file."]),
    "get_invoice": ("INVOICE", ["please send me an invoice for order {order}", "I need a company invoice",
                                "can I get an invoice with my company name", "how do I get a copy of my invoice"],
                    ["Open order {order} in \"My Orders\" and click \"Download Invoice\".",
                     "To add a company name or tax number, edit your billing details before the order ships.",
                     "For a corrected invoice on an older order, send us the order number and the new details.",
                     "We email corrected invoices within two working days."]),
    "delivery_options": ("DELIVERY", ["what delivery options do you have", "do you offer next day delivery",
                                      "can I collect my order from a shop", "how can my order be delivered"],
                         ["Standard delivery takes three to five working days and is free over fifty dollars.",
                          "Express delivery arrives the next working day if you order before two in the afternoon.",
                          "You can also collect your order from more than five hundred pick-up points.",
                          "The available options for your address are shown at checkout."]),
    "delivery_period": ("DELIVERY", ["how long will delivery take", "when will order {order} arrive",
                                     "how many days does shipping take to {town}", "is my order going to arrive this week"],
                        ["Standard orders usually arrive within three to five working days.",
                         "Deliveries to {town} and other remote areas can take one or two days longer.",
                         "The expected delivery date for order {order} is shown in \"My Orders\".",
                         "Public holidays and bad weather can add a short delay."]),
    "contact_customer_service": ("CONTACT", ["how can I contact customer service", "what are your opening hours",
                                             "I need to speak to someone about my order", "what is your phone number"],
                                 ["Our support team is available by chat from eight in the morning to eight in the evening.",
                                  "You can also call us on weekdays between nine and five.",
                                  "For questions about an order, have the order number ready to save time.",
                                  "Emails are answered within one working day."]),
    "contact_human_agent": ("CONTACT", ["I want to talk to a real person", "can I speak to a human agent",
                                        "please put me through to an agent", "I need a human, not a bot"],
                            ["I can connect you with one of our support agents.",
                             "Please type \"agent\" in this chat, or call us during opening hours.",
                             "Waiting times are usually under five minutes.",
                             "Tell the agent your order number so they can help you straight away."]),
    "complaint": ("FEEDBACK", ["I want to make a complaint", "I am unhappy with the service I received",
                               "your delivery driver was rude", "I want to complain about order {order}"],
                  ["I am sorry to hear about your experience, and thank you for telling us.",
                   "Please describe what happened, including the date and the order number if there is one.",
                   "Our customer care team reviews every complaint and replies within three working days.",
                   "Where we got things wrong, we will explain what we are doing to put it right."]),
    "review": ("FEEDBACK", ["I want to leave a review for {item}", "how do I rate a product",
                            "can I write feedback about your service", "where can I post a review"],
                ["Open \"My Orders\" and click \"Write a Review\" next to the item.",
                 "Give a star rating and describe what you liked or did not like.",
                 "Reviews appear on the product page after a short check, usually within a day.",
                 "Your feedback helps other customers and helps us improve."]),
    "newsletter_subscription": ("SUBSCRIPTION", ["I want to subscribe to your newsletter", "how do I stop your emails",
                                                 "please unsubscribe me from the newsletter",
                                                 "can I sign up for offers by email"],
                                ["Go to \"My Account\" and open \"Email Preferences\".",
                                 "Tick or untick \"Newsletter\" and save your choice.",
                                 "Every newsletter also has an \"Unsubscribe\" link at the bottom.",
                                 "Changes can take up to forty-eight hours to apply."]),
    "check_cancellation_fee": ("CANCEL", ["is there a fee to cancel", "will I be charged for cancelling order {order}",
                                          "how much does it cost to cancel", "do you charge a cancellation fee"],
                               ["Cancelling an order before it ships is always free.",
                                "After shipping, you can return the items for free within thirty days.",
                                "Custom-made items carry a fee of ten percent if cancelled after production starts.",
                                "Any fee is shown before you confirm the cancellation."]),
}
ITEMS = ["a pair of running shoes", "a winter coat", "a coffee machine", "a laptop bag", "a desk lamp",
         "a set of kitchen knives", "a kettle", "wireless headphones", "a garden chair", "a backpack"]
PAYMENTS = ["PayPal", "Apple Pay", "Google Pay", "a gift card", "Klarna"]
POLITE_STARTS = ["", "", "hi, ", "hello, ", "good morning, ", "excuse me, ", "hey, ", "please help, "]
POLITE_ENDS = ["", "", "?", " please", ", thanks", ", can you help?", " asap", ", I'm in a hurry"]
OPENERS = ["I understand that you need help to {need_base}, and I'm happy to help.",
           "Thank you for reaching out. I can certainly help you {need_base}.",
           "I'm sorry for any trouble. Let me explain how to {need_base}.",
           "Of course! Here is how you can {need_base}."]
CLOSERS = ["If anything is unclear, just reply here and I will be glad to help further.",
           "Is there anything else I can help you with today?",
           "Thank you for being our customer, and have a great day!",
           "If you run into any problem along the way, our team is here for you."]
NEED_BASE = {"ACCOUNT": "sort out your account", "ORDER": "handle your order", "REFUND": "deal with your refund",
             "SHIPPING": "manage your shipping address", "PAYMENT": "resolve your payment question",
             "INVOICE": "get your invoice", "DELIVERY": "understand your delivery options",
             "CONTACT": "reach the right person", "FEEDBACK": "share your feedback",
             "SUBSCRIPTION": "manage your email subscription", "CANCEL": "understand cancellation charges"}
EXTRA_NOTES = ["Before you start, make sure you are signed in to the account you used for the order.",
               "If you are using the app, the same options are under the menu button in the top left corner.",
               "Changes made on the website also show up in the app, and the other way round.",
               "If a step does not work as described, try refreshing the page or signing out and in again.",
               "We send a confirmation email after each change, so you always have a record of it.",
               "Our chat team can also do this for you if you prefer; just share the order number {order}.",
               "Please note that some options may look slightly different depending on your country.",
"Please keep your order number {order} handy in case you need to contact us.",
               "You can do all of this from our mobile app as well as from the website.",
               "For your security, we will never ask for your full password by email or chat.",
               "Most customers finish these steps in just a few minutes.",
               "Our help centre also has a short video that walks through each step."]


def make_support_dialogue(rng):
    intent = rng.choice(sorted(INTENTS))
    category, requests, steps = INTENTS[intent]
    fields = {"order": f"#{rng.randint(100000, 999999)}", "item": rng.choice(ITEMS),
              "payment": rng.choice(PAYMENTS), "town": rng.choice(TOWNS)}
    request = rng.choice(requests).format(**fields)
    end = rng.choice(POLITE_ENDS)
    instruction = (rng.choice(POLITE_STARTS) + request + end).strip()
    instruction = instruction[0].upper() + instruction[1:]
    if rng.random() < 0.3:
        instruction += " " + rng.choice(["I tried the website but got confused.", "It's quite urgent.",
                                          "This is my first time ordering.", "My friend said you could help."])

    need_base = NEED_BASE[category]
    opener = rng.choice(OPENERS).format(need_base=need_base)
    lines = [opener, ""]
    numbered = rng.random() < 0.7
    for number, step in enumerate(steps, start=1):
        step = step.format(**fields)
        lines.append(f"{number}. {step}" if numbered else f"- {step}")
    lines.append("")
    for note in rng.sample(EXTRA_NOTES, rng.randint(1, 7)):
        lines.append(note.format(**fields))
    lines.append(rng.choice(CLOSERS))
    response = "\n".join(lines)
    return {"instruction": instruction, "category": category, "intent": intent, "response": response}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(20240601)
    write_jsonl(DATA_DIR / "llama2_sample.jsonl", [make_article(rng) for _ in range(NUM_ARTICLES)])
    rng = random.Random(20240602)
    write_jsonl(DATA_DIR / "baichuan2_sample.jsonl", [make_support_dialogue(rng) for _ in range(NUM_SUPPORT_DIALOGUES)])


if __name__ == "__main__":
    main()
