"""The generated databases behind the text-to-SQL data: one parent and one child table per domain.

Each domain is rendered in several naming styles (snake_case, PascalCase, camelCase, abbreviated, UPPER), so
a model has to read the schema in its prompt rather than memorise one. Names are lists of words; the style
decides how they become identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass

CITIES = ["Lisbon", "Oslo", "Denver", "Austin", "Toronto", "Dublin", "Madrid", "Prague", "Osaka", "Lyon", "Perth"]
COUNTRIES = ["Canada", "Brazil", "Germany", "India", "Japan", "Kenya", "Mexico", "Norway", "Spain", "Chile"]
FIRST = ["Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Nikos", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Yara", "Zoe"]
LAST = ["Silva", "Berg", "Novak", "Okafor", "Tanaka", "Larsen", "Moreau", "Khan", "Rossi", "Walsh", "Ivanova",
        "Mendes", "Fischer", "Haddad", "Kowalski", "Nguyen", "Ortiz", "Patel", "Quist", "Reyes"]


@dataclass(frozen=True)
class Column:
    """A column: its identifier words, how questions call it, and how its values are drawn."""

    words: str
    label: str
    values: tuple = ()  # categorical choices
    low: float = 0
    high: float = 0
    real: bool = False


@dataclass(frozen=True)
class Table:
    words: str
    singular: str
    plural: str
    cat: Column
    num: Column
    date: Column


@dataclass(frozen=True)
class Domain:
    key: str
    parent: Table
    child: Table
    names: tuple  # ("person",) or (first parts, second parts) combined "A B"


def cat(words: str, label: str, values: list[str]) -> Column:
    return Column(words, label, tuple(values))


def num(words: str, label: str, low: float, high: float, real: bool = False) -> Column:
    return Column(words, label, (), low, high, real)


def date(words: str, label: str) -> Column:
    return Column(words, label)


def T(words, singular, plural, c, n, d) -> Table:  # noqa: N802 - a short constructor keeps the table below readable
    return Table(words, singular, plural, c, n, d)


PERSON = ("person",)
DOMAINS: list[Domain] = [
    Domain("shop",
           T("customer", "customer", "customers", cat("city", "city", CITIES), num("age", "age", 18, 80),
             date("signup date", "sign-up date")),
           T("order", "order", "orders", cat("status", "status", ["shipped", "pending", "cancelled", "returned"]),
             num("amount", "amount", 5, 500, True), date("order date", "order date")), PERSON),
    Domain("school",
           T("student", "student", "students",
             cat("major", "major", ["Biology", "History", "Physics", "Mathematics", "Economics"]),
             num("gpa", "GPA", 2, 4, True), date("enrollment date", "enrollment date")),
           T("exam result", "exam result", "exam results", cat("term", "term", ["Fall", "Spring", "Summer"]),
             num("score", "score", 40, 100), date("exam date", "exam date")), PERSON),
    Domain("airline",
           T("pilot", "pilot", "pilots", cat("rank", "rank", ["Captain", "First Officer", "Second Officer"]),
             num("flight hours", "flight hours", 500, 20000), date("hire date", "hire date")),
           T("flight", "flight", "flights", cat("destination", "destination", CITIES),
             num("distance", "distance", 200, 9000), date("departure date", "departure date")), PERSON),
    Domain("hospital",
           T("doctor", "doctor", "doctors",
             cat("specialty", "specialty", ["Cardiology", "Neurology", "Pediatrics", "Oncology", "Radiology"]),
             num("years experience", "years of experience", 1, 40), date("start date", "start date")),
           T("appointment", "appointment", "appointments",
             cat("status", "status", ["completed", "cancelled", "missed"]),
             num("fee", "fee", 50, 400, True), date("appointment date", "appointment date")), PERSON),
    Domain("sports",
           T("team", "team", "teams", cat("home city", "home city", CITIES),
             num("founded year", "founding year", 1880, 2010), date("joined date", "league entry date")),
           T("match", "match", "matches", cat("venue", "venue", ["home", "away", "neutral"]),
             num("goals scored", "goals scored", 0, 7), date("match date", "match date")),
           (CITIES, ["Rovers", "United", "Falcons", "Wolves", "Rangers", "Comets", "Tigers"])),
    Domain("hr",
           T("department", "department", "departments", cat("location", "location", CITIES),
             num("budget", "budget", 50000, 2000000), date("created date", "creation date")),
           T("employee", "employee", "employees",
             cat("job title", "job title", ["Engineer", "Analyst", "Manager", "Clerk", "Designer"]),
             num("salary", "salary", 30000, 160000), date("hire date", "hire date")),
           (["Sales", "Legal", "Research", "Support", "Finance", "Marketing", "Logistics", "Quality", "Design"],
            ["Team", "Unit", "Group", "Office"])),
    Domain("library",
           T("author", "author", "authors",
             cat("nationality", "nationality", ["British", "American", "French", "German", "Irish", "Canadian"]),
             num("birth year", "birth year", 1800, 1990), date("debut date", "debut date")),
           T("book", "book", "books", cat("genre", "genre", ["Fiction", "Mystery", "Poetry", "History", "Science"]),
             num("page count", "page count", 80, 900), date("publication date", "publication date")), PERSON),
    Domain("realestate",
           T("agent", "agent", "agents", cat("office", "office", CITIES),
             num("commission rate", "commission rate", 1, 6, True), date("license date", "license date")),
           T("listing", "listing", "listings",
             cat("property type", "property type", ["House", "Apartment", "Condo", "Townhouse"]),
             num("price", "price", 80000, 1500000), date("listing date", "listing date")), PERSON),
    Domain("music",
           T("band", "band", "bands", cat("genre", "genre", ["Rock", "Jazz", "Pop", "Metal", "Folk"]),
             num("formed year", "year formed", 1960, 2020), date("signed date", "signing date")),
           T("concert", "concert", "concerts", cat("country", "country", COUNTRIES),
             num("tickets sold", "tickets sold", 100, 50000), date("concert date", "concert date")),
           (["Silver", "Electric", "Velvet", "Iron", "Neon", "Paper", "Crystal", "Midnight"],
            ["Echoes", "Foxes", "Owls", "Tides", "Engines", "Ghosts", "Lanterns"])),
    Domain("restaurant",
           T("restaurant", "restaurant", "restaurants",
             cat("cuisine", "cuisine", ["Italian", "Mexican", "Thai", "Indian", "French", "Japanese"]),
             num("rating", "rating", 1, 5, True), date("opening date", "opening date")),
           T("reservation", "reservation", "reservations", cat("seating", "seating", ["indoor", "outdoor", "bar"]),
             num("party size", "party size", 1, 12), date("reservation date", "reservation date")),
           (["Golden", "Blue", "Little", "Olive", "Red", "Corner", "Harbor"],
            ["Spoon", "Table", "Kitchen", "Garden", "Bistro", "Lantern"])),
    Domain("gym",
           T("member", "member", "members",
             cat("membership plan", "membership plan", ["Basic", "Premium", "Student", "Family"]),
             num("age", "age", 16, 75), date("join date", "join date")),
           T("workout session", "workout session", "workout sessions",
             cat("activity", "activity", ["Yoga", "Spinning", "Boxing", "Pilates", "Weights"]),
             num("duration minutes", "duration in minutes", 20, 120), date("session date", "session date")), PERSON),
    Domain("bank",
           T("client", "client", "clients", cat("branch", "branch", CITIES),
             num("credit score", "credit score", 300, 850), date("opened date", "account opening date")),
           T("transaction", "transaction", "transactions",
             cat("transaction type", "transaction type", ["deposit", "withdrawal", "transfer", "payment"]),
             num("amount", "amount", 1, 5000, True), date("transaction date", "transaction date")), PERSON),
    Domain("movies",
           T("director", "director", "directors", cat("country", "country", COUNTRIES),
             num("birth year", "birth year", 1930, 1990), date("debut date", "debut date")),
           T("film", "film", "films", cat("genre", "genre", ["Drama", "Comedy", "Thriller", "Horror", "Animation"]),
             num("box office", "box office", 1, 900, True), date("release date", "release date")), PERSON),
    Domain("logistics",
           T("warehouse", "warehouse", "warehouses",
             cat("region", "region", ["North", "South", "East", "West", "Central"]),
             num("capacity", "capacity", 1000, 50000), date("opened date", "opening date")),
           T("shipment", "shipment", "shipments", cat("carrier", "carrier", ["DHL", "UPS", "FedEx", "Maersk"]),
             num("weight kg", "weight in kg", 1, 2000, True), date("ship date", "ship date")),
           (CITIES, ["Hub", "Depot", "Yard", "Terminal"])),
    Domain("university",
           T("professor", "professor", "professors",
             cat("department", "department", ["Math", "Physics", "Chemistry", "Biology", "History"]),
             num("salary", "salary", 50000, 190000), date("hire date", "hire date")),
           T("course", "course", "courses", cat("level", "level", ["Introductory", "Intermediate", "Advanced"]),
             num("credits", "credits", 1, 6), date("start date", "start date")), PERSON),
    Domain("vet",
           T("owner", "owner", "owners", cat("city", "city", CITIES), num("age", "age", 18, 90),
             date("registration date", "registration date")),
           T("pet", "pet", "pets", cat("species", "species", ["Dog", "Cat", "Rabbit", "Parrot", "Hamster"]),
             num("weight", "weight", 1, 60, True), date("birth date", "birth date")), PERSON),
    Domain("carrental",
           T("car", "car", "cars", cat("fuel type", "fuel type", ["Petrol", "Diesel", "Electric", "Hybrid"]),
             num("daily rate", "daily rate", 20, 200, True), date("purchase date", "purchase date")),
           T("rental", "rental", "rentals", cat("pickup location", "pickup location", CITIES),
             num("days", "number of days", 1, 30), date("rental date", "rental date")),
           (["Toyota", "Ford", "Kia", "Volvo", "Fiat", "Honda", "Skoda"], ["Corolla", "Focus", "Rio", "V40", "Panda", "Civic", "Octavia"])),
    Domain("hotel",
           T("hotel", "hotel", "hotels", cat("city", "city", CITIES), num("stars", "star rating", 1, 5),
             date("opened date", "opening date")),
           T("booking", "booking", "bookings", cat("room type", "room type", ["Single", "Double", "Suite", "Family"]),
             num("nights", "number of nights", 1, 14), date("check in date", "check-in date")),
           (["Grand", "Royal", "Park", "Ocean", "Alpine", "City"], ["Palace", "Inn", "Lodge", "Resort", "Plaza"])),
    Domain("software",
           T("project", "project", "projects",
             cat("language", "language", ["Python", "Rust", "Go", "Java", "TypeScript"]),
             num("stars", "star count", 10, 90000), date("created date", "creation date")),
           T("issue", "issue", "issues", cat("priority", "priority", ["low", "medium", "high", "critical"]),
             num("comments", "number of comments", 0, 80), date("opened date", "opening date")),
           (["fast", "tiny", "open", "deep", "quick", "smart", "lazy"], ["parser", "cache", "router", "queue", "linter"])),
    Domain("farm",
           T("farm", "farm", "farms", cat("region", "region", ["North", "South", "East", "West", "Central"]),
             num("area hectares", "area in hectares", 10, 3000, True), date("founded date", "founding date")),
           T("harvest", "harvest", "harvests", cat("crop", "crop", ["Wheat", "Corn", "Barley", "Soy", "Potato"]),
             num("yield tonnes", "yield in tonnes", 1, 500, True), date("harvest date", "harvest date")),
           (["Green", "Sunny", "Willow", "Oak", "Maple", "River"], ["Acres", "Fields", "Meadow", "Ranch"])),
    Domain("museum",
           T("museum", "museum", "museums", cat("city", "city", CITIES),
             num("annual visitors", "annual visitors", 10000, 5000000), date("opened date", "opening date")),
           T("artwork", "artwork", "artworks",
             cat("medium", "medium", ["Oil", "Watercolor", "Bronze", "Marble", "Photography"]),
             num("value", "value", 1000, 5000000), date("acquisition date", "acquisition date")),
           (["National", "Modern", "Maritime", "Natural", "Folk"], ["Gallery", "Museum", "Collection", "Archive"])),
    Domain("conference",
           T("conference", "conference", "conferences", cat("city", "city", CITIES),
             num("attendees", "number of attendees", 100, 20000), date("start date", "start date")),
           T("talk", "talk", "talks", cat("track", "track", ["AI", "Security", "Web", "Data", "Cloud"]),
             num("duration", "duration", 15, 90), date("talk date", "talk date")),
           (["PyData", "DevCon", "CloudSummit", "DataWeek", "SecFest"], ["Europe", "Asia", "North", "Live", "Online"])),
    Domain("pharmacy",
           T("supplier", "supplier", "suppliers", cat("country", "country", COUNTRIES),
             num("rating", "rating", 1, 5, True), date("contract date", "contract date")),
           T("product", "product", "products",
             cat("category", "category", ["Vitamins", "Painkillers", "Antibiotics", "Skincare"]),
             num("price", "price", 2, 150, True), date("expiry date", "expiry date")),
           (["Acme", "Nova", "Vital", "Pure", "Medi"], ["Labs", "Pharma", "Health", "Supply"])),
    Domain("games",
           T("player", "player", "players", cat("country", "country", COUNTRIES), num("level", "level", 1, 100),
             date("registration date", "registration date")),
           T("game session", "game session", "game sessions", cat("mode", "mode", ["solo", "duo", "squad"]),
             num("score", "score", 0, 5000), date("played date", "date played")), PERSON),
    Domain("transit",
           T("station", "station", "stations", cat("zone", "zone", ["Zone 1", "Zone 2", "Zone 3", "Zone 4"]),
             num("daily passengers", "daily passengers", 500, 90000), date("opened date", "opening date")),
           T("departure", "departure", "departures", cat("line", "line", ["Red", "Blue", "Green", "Yellow"]),
             num("delay minutes", "delay in minutes", 0, 45), date("departure date", "departure date")),
           (CITIES, ["Central", "North", "Bridge", "Park", "Square"])),
    Domain("charity",
           T("donor", "donor", "donors", cat("country", "country", COUNTRIES), num("age", "age", 18, 90),
             date("first donation date", "first donation date")),
           T("donation", "donation", "donations",
             cat("campaign", "campaign", ["Clean Water", "Education", "Health", "Shelter"]),
             num("amount", "amount", 5, 10000, True), date("donation date", "donation date")), PERSON),
    Domain("newspaper",
           T("journalist", "journalist", "journalists",
             cat("section", "section", ["Politics", "Sports", "Culture", "Business", "Science"]),
             num("years active", "years active", 1, 40), date("hire date", "hire date")),
           T("article", "article", "articles", cat("status", "status", ["published", "draft", "retracted"]),
             num("word count", "word count", 200, 5000), date("publication date", "publication date")), PERSON),
    Domain("energy",
           T("power plant", "power plant", "power plants",
             cat("fuel", "fuel", ["Solar", "Wind", "Hydro", "Gas", "Nuclear"]),
             num("capacity mw", "capacity in MW", 5, 3000), date("commissioned date", "commissioning date")),
           T("outage", "outage", "outages", cat("cause", "cause", ["storm", "maintenance", "fault", "overload"]),
             num("duration hours", "duration in hours", 1, 72), date("outage date", "outage date")),
           (CITIES, ["Solar Park", "Wind Farm", "Station", "Dam"])),
]

# Whole domains never seen in training: the test split's unseen-schema databases.
HELD_OUT_DOMAINS = ("hospital", "hotel", "museum", "energy")

ABBREVIATIONS = {
    "customer": "cust", "amount": "amt", "date": "dt", "number": "num", "department": "dept",
    "employee": "emp", "salary": "sal", "price": "prc", "quantity": "qty", "transaction": "txn",
    "registration": "reg", "experience": "exp", "appointment": "appt", "description": "desc",
    "student": "stu", "enrollment": "enrl", "duration": "dur", "minutes": "min", "category": "cat",
    "professor": "prof", "reservation": "resv", "restaurant": "rest", "warehouse": "whse", "shipment": "shpmt",
    "weight": "wt", "location": "loc", "country": "ctry", "passengers": "pax", "departure": "dep",
    "commission": "comm", "rating": "rtg", "capacity": "cap", "publication": "pub", "identifier": "id",
    "journalist": "jrnl", "conference": "conf", "session": "sess", "workout": "wkt", "membership": "mbr",
    "member": "mbr", "credits": "cr", "comments": "cmts", "article": "art", "donation": "don",
}
STYLES = ("snake", "pascal", "camel", "abbrev", "upper")


def ident(words: str, style: str) -> str:
    """Words -> an identifier in a naming style."""
    parts = words.split()
    if style == "snake":
        return "_".join(parts)
    if style == "pascal":
        return "".join(p.capitalize() for p in parts)
    if style == "camel":
        return parts[0] + "".join(p.capitalize() for p in parts[1:])
    if style == "abbrev":
        return "_".join(ABBREVIATIONS.get(p, p) for p in parts)
    if style == "upper":
        return "_".join(parts).upper()
    raise ValueError(style)


# Singular table names that are SQL keywords ("Order", "Match", "Transaction") take the plural instead.
SQL_KEYWORDS = {"order", "match", "transaction", "group", "case", "index", "check", "references", "table", "values"}


def table_ident(table: Table, style: str) -> str:
    if style == "pascal" and table.words not in SQL_KEYWORDS:
        return ident(table.words, style)  # singular, Chinook-style
    if style == "abbrev":
        return "tbl_" + ident(table.words, style)
    return ident(table.plural, style)


def pk_ident(table: Table, style: str) -> str:
    return ident(f"{table.words} id", style) if style == "pascal" else ident("id", style)


def fk_ident(parent: Table, style: str) -> str:
    return ident(f"{parent.words} id", style)
